"""`musclelora train`: train one method preset on one training file, then score it on the test files.

The files are named (`--train`, `--dev`, `--test-clean`, `--test-poison`) or taken from one attack folder of the
OpenBackdoor layout (`--attack NAME`, with `--data` and `--task` as in `bench`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..data import load_splits
from ..overrides import parse_preset_items
from ..presets import PRESETS, get_preset
from ..runner import train_cell
from .options import add_attack_option, add_column_options, add_common, add_data_options, files_or_attack

# `--train` etc. and the attack file each stands for with `--attack`
FILES = {"train": "train", "dev": "dev", "test_clean": "test_clean", "test_poison": "test_poison"}

HEADLINE = (
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


def register(subparsers: Any) -> None:
    """Add the `train` command."""
    parser = subparsers.add_parser(
        "train", help="Train one method on one training file", description="Train one method."
    )
    parser.add_argument("--method", required=True, choices=list(PRESETS), help="Method preset")
    parser.add_argument(
        "--train",
        default=None,
        help="Training file: OpenBackdoor CSV, CSV/TSV/JSONL with named columns, or a save_to_disk directory",
    )
    parser.add_argument("--dev", default=None, help="Clean dev file for checkpoint selection")
    parser.add_argument("--test-clean", default=None, help="Clean test file (CACC, false-target rate)")
    parser.add_argument("--test-poison", default=None, help="Triggered test file (ASR)")
    parser.add_argument("--output-dir", default="musclelora-out", help="Output directory (default musclelora-out)")
    parser.add_argument("--print-preset", action="store_true", help="Print the preset with overrides and exit")
    add_attack_option(parser, "--train (train-mixed-*.csv), --dev (dev-clean.csv) and the two test files")
    add_data_options(parser)
    add_column_options(parser)
    add_common(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train (or print the resolved preset); 0."""
    preset = get_preset(args.method, parse_preset_items(args.overrides))
    if args.print_preset:
        print(preset.format())
        return 0
    files = files_or_attack(args, FILES, required=("train", "dev"))
    # Every file is read with the labels of the training file before anything trains.
    others = {name: path for name, path in files.items() if name != "train" and path is not None}
    columns = {"text_column": args.text_column, "label_column": args.label_column, "label_names": args.label_names}
    labels, train, data = load_splits(files["train"], others, args.num_labels, **columns)
    labels.check_target(args.target_label)
    result = train_cell(
        preset,
        train,
        data["dev"],
        args.output_dir,
        model_dir=args.model,
        seed=args.seed,
        test_clean=data.get("test_clean"),
        test_poison=data.get("test_poison"),
        target_label=args.target_label,
        num_labels=labels.num_labels,
        progress=not args.quiet,
        load_in_4bit=args.load_in_4bit,
        label_names=labels.names,
    )
    headline = {key: result[key] for key in HEADLINE if key in result}
    print(json.dumps(headline | {"adapter_dir": result.get("adapter_dir")}, indent=2))
    return 0
