"""`musclelora eval`: score a saved classifier cell on a clean and a triggered test file (named, or an attack's
`test-clean.csv` and `test-poison.csv` with `--attack`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..artefacts import write_json
from ..evaluation import evaluate
from .options import add_attack_option, add_column_options, add_data_options, files_or_attack

FILES = {"clean": "test_clean", "poison": "test_poison"}  # `--clean`/`--poison` and their attack files


def register(subparsers: Any) -> None:
    """Add the `eval` command."""
    parser = subparsers.add_parser("eval", help="Evaluate a saved adapter", description="Evaluate a saved cell.")
    parser.add_argument("--adapter", required=True, help="The adapter directory written by `train`")
    parser.add_argument("--clean", default=None, help="Clean test file")
    parser.add_argument("--poison", default=None, help="Triggered test file (non-target rows, trigger applied)")
    add_attack_option(parser, "--clean (test-clean.csv) and --poison (test-poison.csv)")
    add_data_options(parser, num_labels=False)  # the labels are the cell's
    parser.add_argument("--target-label", type=int, default=None, help="Default: the label the cell was trained for")
    parser.add_argument("--output", default=None, help="Also write the metrics JSON here (refused if it exists)")
    parser.add_argument("--overwrite", action="store_true", help="Let --output replace an existing file")
    parser.add_argument("--quiet", action="store_true", help="No progress bars")
    add_column_options(parser, label_names=False)  # string labels are mapped as the cell recorded
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Score the cell and print (and optionally write) its metrics; 0."""
    output = Path(args.output) if args.output else None
    if output is not None:  # checked before the model is loaded, so a refusal costs nothing
        if output.is_dir():
            raise ValueError(f"--output {output}: is a directory, expected a file path.")
        if output.exists() and not args.overwrite:
            raise ValueError(f"--output {output}: file exists; pass --overwrite to replace it.")
        if not output.parent.is_dir():
            raise ValueError(f"--output {output}: directory {output.parent} does not exist.")
    files = files_or_attack(args, FILES, required=("clean", "poison"))
    columns = {"text_column": args.text_column, "label_column": args.label_column}
    progress = not args.quiet
    result = evaluate(args.adapter, files["clean"], files["poison"], args.target_label, progress=progress, **columns)
    if output is not None:
        write_json(output, result)
    print(json.dumps(result, indent=2))
    return 0
