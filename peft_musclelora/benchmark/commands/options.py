"""What the commands share: argument types (seeds, lists), the common options, the run options of `bench` and
`curve`, their resolution into a [`BenchRun`], and the Ctrl-C report."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..artefacts import prepare_output_dir
from ..builders import default_model_dir
from ..cells import BenchRun
from ..data import DEFAULT_TASK, NumLabelsError, SharedData, attack_labels
from ..overrides import SetItems, parse_set_items
from ..presets import QUICK_OVERRIDES
from ..spec import check_methods

MAX_SEED = 2**32 - 1  # numpy's limit; transformers' set_seed seeds numpy with it


def seed_type(text: str) -> int:
    """One seed, parsed at the command line: an integer in [0, 2**32 - 1]."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    return seed


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds must name at least one seed")
    bad = [seed for seed in seeds if not 0 <= seed <= MAX_SEED]
    if bad:
        raise argparse.ArgumentTypeError(f"--seeds must be in [0, {MAX_SEED}], got {bad[0]} in {text!r}")
    return seeds


def size_list(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("--sizes must name at least one size")
    return sizes


def name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return names


ONLY_FINISHED_HELP = "Train nothing: build the tables from the finished cells; the others are listed as not run"


def add_common(parser: argparse.ArgumentParser) -> None:
    """The options `train`, `bench` and `curve` share: model, seed, `--set`, target label, quiet, 4-bit loading."""
    parser.add_argument(
        "--model", default=None, help="Local model directory (default: MiniLM-L6 from the models extra)"
    )
    parser.add_argument("--seed", type=seed_type, default=0, help="Seed of every random choice (default 0)")
    add_set_option(parser)
    parser.add_argument("--target-label", type=int, default=1, help="The backdoor's target label (default 1)")
    parser.add_argument("--quiet", action="store_true", help="No progress bars")
    parser.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="Load the base model in NF4 4-bit (QLoRA; needs the bnb extra) and prepare it for k-bit training",
    )


def add_run_options(parser: argparse.ArgumentParser, output_dir: str, preset_help: str, plot_help: str) -> None:
    """The options `bench` and `curve` share: seeds, data, preset, output, plot, --only-finished, the common ones."""
    parser.add_argument("--seeds", type=seed_list, default=[0], help="Comma-separated seeds (default 0)")
    add_data_options(parser)
    parser.add_argument("--preset", choices=("quick", "full"), default="full", help=preset_help)
    parser.add_argument("--output-dir", default=output_dir, help=f"Output directory (default {output_dir})")
    parser.add_argument("--no-plot", action="store_true", help=plot_help)
    parser.add_argument("--only-finished", action="store_true", help=ONLY_FINISHED_HELP)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Retrain and replace finished cells whose settings differ from this run's (refused without it)",
    )
    add_common(parser)
    parser.set_defaults(seed=None)


def add_data_options(parser: Any, num_labels: bool = True) -> None:
    """`--data`, `--task` and `--num-labels`: where the OpenBackdoor-layout data is and how many classes it has."""
    data_help = "Data dir holding <task>/poison/<attack>/ (default: $MUSCLELORA_DATA, then ../shared/data)"
    parser.add_argument("--data", default=None, help=data_help)
    parser.add_argument(
        "--task",
        default=DEFAULT_TASK,
        help=f"Task folder of the data dir (default {DEFAULT_TASK}); any folder with poison/",
    )
    if num_labels:
        parser.add_argument("--num-labels", type=num_labels_type, default=None, help=NUM_LABELS_HELP)


def add_attack_option(parser: Any, reads: str) -> None:
    """`--attack NAME` (with `--data`, `--task`): take `reads` from `<data>/<task>/poison/NAME/` instead of naming
    each file."""
    parser.add_argument(
        "--attack", default=None, help=f"Read {reads} from <data>/<task>/poison/ATTACK/ instead of naming the files"
    )


def files_or_attack(args: argparse.Namespace, files: dict[str, str], required: tuple[str, ...]) -> dict[str, Any]:
    """The files a command reads: the options in `files` (`{attribute: attack field}`), or, with `--attack`, the
    attack's files of that name. Either one or the other: a mix, or neither, is a one-line `ValueError`."""
    given = {name: getattr(args, name) for name in files}
    flag = {name: "--" + name.replace("_", "-") for name in files}
    if args.attack is None:
        missing = [flag[name] for name in required if given[name] is None]
        if missing:
            raise ValueError(
                f"{' and '.join(missing)} required, or --attack NAME to read the files of "
                "<data>/<task>/poison/NAME/ (see --data, --task)."
            )
        return given
    named = [flag[name] for name, value in given.items() if value is not None]
    if named:
        raise ValueError(f"--attack {args.attack!r} reads the attack's files; drop {', '.join(named)} or --attack.")
    shared = SharedData.resolve(args.data, args.task)
    shared.check_task()
    attack = shared.attack_files(args.attack)
    return {name: getattr(attack, field) for name, field in files.items()}


def add_column_options(parser: Any, label_names: bool = True) -> None:
    """`--text-column`, `--label-column` (files with named columns) and `--label-names` (string labels' ids)."""
    parser.add_argument(
        "--text-column", default=None, help="Text column of CSV/TSV/JSONL files (default text/sentence)"
    )
    parser.add_argument("--label-column", default=None, help="Label column of CSV/TSV/JSONL files (default label)")
    if label_names:
        parser.add_argument(
            "--label-names",
            type=name_list,
            default=None,
            help="Comma-separated label values in id order (default: integer labels as ids, string labels sorted)",
        )


NUM_LABELS_HELP = "Number of classes (default: found in the training data; may not be smaller)"


def num_labels_type(text: str) -> int:
    """`--num-labels`: an integer >= 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--num-labels must be an integer >= 2, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"--num-labels must be an integer >= 2, got {value}")
    return value


def add_set_option(
    parser: argparse.ArgumentParser, help: str = "Override a preset field, repeatable (see `musclelora presets`)"
) -> None:
    """`--set KEY=VALUE`, repeatable, collected as strings for [`parse_set_items`]."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def bench_items(preset: str, overrides: list[str]) -> SetItems:
    """The `--set` items of a bench or curve run, parsed once: the quick preset's first, then the user's."""
    quick = [f"{key}={value}" for key, value in QUICK_OVERRIDES.items()] if preset == "quick" else []
    return parse_set_items([*quick, *overrides])


def resolve_run(args: argparse.Namespace, methods: list[str]) -> tuple[BenchRun, list[int]]:
    """The [`BenchRun`] and seeds of `bench`/`curve`, every method and option checked before anything trains."""
    items = bench_items(args.preset, args.overrides)
    check_methods(methods, items)  # fail early on an unknown method, override or defense option
    seeds = [args.seed] if args.seed is not None else args.seeds
    shared = SharedData.resolve(args.data, args.task)
    shared.check_task()
    missing = [attack for attack in args.attacks if attack not in shared.attacks()]
    if missing:
        raise ValueError(f"attacks {missing} not found in {shared.root / shared.task}; have {shared.attacks()}.")
    for attack in args.attacks:  # a flag the data contradicts is refused before anything trains
        try:
            labels = attack_labels(shared.attack_files(attack), args.num_labels)
        except NumLabelsError:
            raise
        except ValueError:
            continue  # a bad file of one attack is recorded in its cells, the others run
        labels.check_target(args.target_label)
    run = BenchRun(
        shared=shared,
        output_dir=prepare_output_dir(args.output_dir),
        model_dir=str(Path(args.model) if args.model else default_model_dir()),
        bench_preset=args.preset,
        items=items,
        user_items=tuple(args.overrides),
        target_label=args.target_label,
        num_labels=args.num_labels,
        progress=not args.quiet,
        load_in_4bit=args.load_in_4bit,
        only_finished=args.only_finished,
        overwrite=args.overwrite,
    )
    return run, seeds


class BenchInterrupted(Exception):
    """Ctrl-C during a bench or curve; the message says what finished and that re-running resumes."""


@contextlib.contextmanager
def interruption_report(cells: list[dict[str, Any]], planned: int, command: str) -> Iterator[None]:
    # A KeyboardInterrupt would print a traceback of a hundred lines from inside torch; what the user needs is which
    # cells are safe (finished cells are kept, the interrupted one left no files) and how to go on.
    try:
        yield
    except KeyboardInterrupt:
        done = [c for c in cells if c.get("status") == "ok"]
        names = ", ".join(f"{c.get('attack')}/{c.get('method')}/seed{c.get('seed')}" for c in done[:6])
        more = f" and {len(done) - 6} more" if len(done) > 6 else ""
        finished = f" ({names}{more})" if done else ""
        raise BenchInterrupted(
            f"interrupted after {len(cells)} of {planned} cells, {len(done)} finished{finished}; the interrupted "
            "cell left no files. Re-running the same command resumes from the finished cells."
        ) from None
