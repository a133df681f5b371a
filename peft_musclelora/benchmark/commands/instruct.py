"""`musclelora instruct`: instruction-tune a causal LM on a poisoned training file (TRL SFT) and score CACC/ASR."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..instruct import INSTRUCT_METHODS, InstructSettings, instruct_settings, train_instruct
from ..overrides import parse_fields, split_item
from .options import add_set_option, seed_type

HEADLINE = ("method", "gradient_alignment", "cacc", "asr", "false_target_rate", "train_time_s", "peak_rss_mb", "steps")


def register(subparsers: Any) -> None:
    """Add the `instruct` command."""
    parser = subparsers.add_parser(
        "instruct",
        help="Instruction-tune a causal LM on a poisoned training file (TRL SFT) and score CACC/ASR",
        description="Rows become 'Review: ... Is the sentiment ... ? Answer:' prompts answered ' positive' or "
        "' negative'; predictions compare the two label words' log-probabilities at the answer position.",
    )
    parser.add_argument(
        "--method",
        required=True,
        choices=list(INSTRUCT_METHODS),
        help="lora: undefended LoRA on the body; musclelora: plus MSLR on `mslr_target` and gradient alignment; "
        "fit-gap: LoRA on the rows fit-gap row filtering keeps (trusted rows: reference_split_size; experimental); "
        "recommended: the best measured, musclelora",
    )
    parser.add_argument("--train", required=True, help="Training file")
    parser.add_argument("--dev", required=True, help="Clean dev file (GA references)")
    parser.add_argument("--test-clean", default=None, help="Clean test file (CACC)")
    parser.add_argument("--test-poison", default=None, help="Triggered test file (ASR)")
    parser.add_argument("--output-dir", default="musclelora-instruct", help="Output directory")
    parser.add_argument("--model", required=True, help="Local causal-LM directory (see `musclelora export-model`)")
    parser.add_argument("--seed", type=seed_type, default=0, help="Seed (default 0)")
    parser.add_argument("--target-label", type=int, default=1, help="The backdoor's target label (default 1)")
    parser.add_argument("--load-in-4bit", action="store_true", help="NF4 4-bit base (QLoRA)")
    parser.add_argument("--quiet", action="store_true", help="No progress bars")
    add_set_option(
        parser,
        "Override an InstructSettings field, its GA or row-filter fields included, on top of the method's own "
        "settings (e.g. mslr_target=down_proj, max_train_rows=256, reference_split_size=64), repeatable",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train and score one instruction cell; 0."""
    changes = parse_fields([split_item(item) for item in args.overrides], InstructSettings)
    result = train_instruct(
        args.method,
        args.train,
        args.dev,
        args.output_dir,
        args.model,
        settings=instruct_settings(args.method, changes),
        load_in_4bit=args.load_in_4bit,
        test_clean=args.test_clean,
        test_poison=args.test_poison,
        target_label=args.target_label,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(json.dumps({key: result.get(key) for key in HEADLINE} | {"adapter_dir": result["adapter_dir"]}, indent=2))
    return 0
