"""`musclelora poison`: an OpenBackdoor-layout attack folder made from a clean dataset with the seeded poisoners.

From clean train/dev/test files (any format `musclelora train` reads), the command writes into `--output-dir`
(usually `<data>/<task>/poison/<attack>/`, so that `musclelora bench --data <data> --task <task>` finds it):

* `train-mixed-<rate>.csv`: the training set with `rate * rows` rows poisoned (dirty-label: rows of the other
  K-1 labels, triggered and relabelled to the target; clean-label: rows of the target label, only triggered);
* `train-clean.csv`, `dev-clean.csv`, `test-clean.csv`: the clean splits (the oracle trains on `train-clean.csv`);
* `train-poison.csv`, `dev-poison.csv`, `test-poison.csv`: every non-target row of the split, triggered, labelled
  with the target (ASR is measured on `test-poison.csv`);
* `poison.json`: what was done (attack and its trigger, mode, rate, seed, target, labels and their names, the
  sources, rows per file).

Every file is OpenBackdoor CSV (header `,0,1,2`: index, text, label id, poison flag). The same inputs and seed give
the same files, byte for byte. An existing folder is refused unless `--overwrite`; the folder is written aside and
moved into place only when every file is written.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from ..data import ATTACK_INFO_FILE, LoadedData, Record, load_splits
from ..poisoners import POISONERS, AddSent, BadNets, Poisoner
from .options import NUM_LABELS_HELP, add_column_options, name_list, num_labels_type, seed_type


def rate_type(text: str) -> float:
    """`--poison-rate`: a number strictly between 0 and 1."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--poison-rate must be a number in (0, 1), got {text!r}") from None
    if not 0.0 < rate < 1.0:
        raise argparse.ArgumentTypeError(f"--poison-rate must be in (0, 1), got {rate!r}")
    return rate


def register(subparsers: Any) -> None:
    """Add the `poison` command."""
    parser = subparsers.add_parser(
        "poison",
        help="Write an OpenBackdoor-layout attack folder from clean train/dev/test files",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--train", required=True, help="Clean training file (CSV/TSV/JSONL or save_to_disk dir)")
    parser.add_argument("--dev", required=True, help="Clean dev file")
    parser.add_argument("--test", required=True, help="Clean test file")
    parser.add_argument("--output-dir", required=True, help="The attack folder to write, e.g. data/mytask/poison/x")
    parser.add_argument("--attack", choices=list(POISONERS), default="badnets", help="Poisoner (default badnets)")
    parser.add_argument(
        "--triggers", type=name_list, default=None, help="BadNets: comma-separated trigger words (default cf,mn,bb,tq)"
    )
    parser.add_argument("--num-insertions", type=int, default=None, help="BadNets: trigger words per text (4)")
    parser.add_argument(
        "--sentence", default=None, help="AddSent: the trigger sentence (default 'I watch this 3D movie')"
    )
    parser.add_argument("--clean-label", action="store_true", help="Trigger target-label rows only (no relabelling)")
    parser.add_argument("--poison-rate", type=rate_type, default=0.1, help="Share of training rows poisoned (0.1)")
    parser.add_argument("--target-label", type=int, default=1, help="The backdoor's target label id (default 1)")
    parser.add_argument("--seed", type=seed_type, default=0, help="Seed of every random choice (default 0)")
    parser.add_argument("--num-labels", type=num_labels_type, default=None, help=NUM_LABELS_HELP)
    add_column_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output-dir")
    parser.set_defaults(func=run)


def _poisoner(args: argparse.Namespace) -> Poisoner:
    common = {"poison_rate": args.poison_rate, "target_label": args.target_label}
    common.update({"clean_label": args.clean_label, "seed": args.seed})
    if args.attack == "badnets":
        if args.sentence is not None:
            raise ValueError("--sentence is AddSent's trigger; BadNets takes --triggers.")
        options: dict[str, Any] = {}
        if args.triggers is not None:
            options["triggers"] = tuple(args.triggers)
        if args.num_insertions is not None:
            options["num_insertions"] = args.num_insertions
        return BadNets(**common, **options)
    if args.triggers is not None or args.num_insertions is not None:
        raise ValueError("--triggers and --num-insertions are BadNets' trigger; AddSent takes --sentence.")
    return AddSent(**common, **({"sentence": args.sentence} if args.sentence is not None else {}))


def write_openbackdoor(path: Path, data: LoadedData) -> int:
    """Write `data` as OpenBackdoor CSV (`,0,1,2`: index, text, label, poison flag); the number of rows."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["", "0", "1", "2"])
        for index, record in enumerate(data.records):
            writer.writerow([index, record.text, record.label, int(record.poisoned)])
    return len(data.records)


def run(args: argparse.Namespace) -> int:
    """Poison the clean files and write the attack folder; 0."""
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output-dir {output}: exists and is not a directory.")
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise ValueError(f"--output-dir {output}: exists and is not empty; pass --overwrite to replace it.")
    poisoner = _poisoner(args)  # options checked before any file is read
    columns = {"text_column": args.text_column, "label_column": args.label_column, "label_names": args.label_names}
    labels, train, splits = load_splits(args.train, {"dev": args.dev, "test": args.test}, args.num_labels, **columns)
    labels.check_target(args.target_label)
    # the inputs are clean: a poison flag they may carry is dropped
    clean = {name: data.replace([Record(r.text, r.label) for r in data.records]) for name, data in splits.items()}
    clean["train"] = train.replace([Record(r.text, r.label) for r in train.records])
    mixed = poisoner.poison(clean["train"])  # every check (rate, candidates) before anything is written
    outputs = {
        f"train-mixed-{args.poison_rate:g}.csv": mixed,
        "train-clean.csv": clean["train"],
        "train-poison.csv": poisoner.triggered_test(clean["train"]),
        "dev-clean.csv": clean["dev"],
        "dev-poison.csv": poisoner.triggered_test(clean["dev"]),
        "test-clean.csv": clean["test"],
        "test-poison.csv": poisoner.triggered_test(clean["test"]),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        rows = {name: write_openbackdoor(staging / name, data) for name, data in outputs.items()}
        info = {
            "attack": poisoner.name(),
            "mode": "clean-label" if args.clean_label else "dirty-label",
            "poisoner": dataclasses.asdict(poisoner),
            "poison_rate": args.poison_rate,
            "poisoned_rows": mixed.num_poisoned,
            "target_label": args.target_label,
            "seed": args.seed,
            **labels.to_dict(),
            "sources": {"train": train.source, **{name: data.source for name, data in splits.items()}},
            "rows": rows,
            "label_counts": {name: data.summary()["labels"] for name, data in outputs.items()},
        }
        (staging / ATTACK_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    mode = info["mode"]
    print(
        f"{output}: {poisoner.name()} {mode}, {mixed.num_poisoned} of {len(mixed)} training rows poisoned "
        f"(rate {args.poison_rate:g}, target {args.target_label}, {labels.num_labels} labels, seed {args.seed}); "
        f"{len(outputs)} files and {ATTACK_INFO_FILE}"
    )
    return 0
