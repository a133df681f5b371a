"""`musclelora presets`: print the method presets, with `--set` overrides applied."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..overrides import parse_preset_items
from ..presets import PRESETS, get_preset
from .options import add_set_option


def register(subparsers: Any) -> None:
    """Add the `presets` command."""
    parser = subparsers.add_parser("presets", help="Print the method presets", description="Print the method presets.")
    parser.add_argument("names", nargs="*", help="Presets to print (default: all)")
    parser.add_argument("--json", action="store_true", help="Print JSON")
    add_set_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the presets; 0."""
    overrides = parse_preset_items(args.overrides)
    chosen = [get_preset(name, overrides) for name in args.names or list(PRESETS)]
    if args.json:
        print(json.dumps({preset.name: preset.to_dict() for preset in chosen}, indent=2))
    else:
        print("\n\n".join(preset.format() for preset in chosen))
    return 0
