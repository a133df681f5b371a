"""The `musclelora` command: `train`, `analyze`, `eval`, `bench`, `curve`, `poison`, `instruct`, `export-model`,
`presets`.

Run `musclelora <command> --help` for the options of each. Each command is a module of
[`peft_musclelora.benchmark.commands`]; this one builds the parser from them and turns errors into exit codes: 0 on
success, 2 on a usage error, 1 on a data/model error (printed as one line), 130 on Ctrl-C.

Example:
    >>> parser = build_parser()
    >>> parser.parse_args(["presets", "lora", "--set", "r=2"]).overrides
    ['r=2']
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

import datasets
import transformers

from .commands import COMMANDS
from .commands.options import BenchInterrupted


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `musclelora` command."""
    parser = argparse.ArgumentParser(
        prog="musclelora", description="MuScleLoRA backdoor benchmark: train, evaluate and compare methods."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `musclelora` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "quiet", False):  # no progress bars from datasets (tokenizing) and transformers (loading)
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    try:
        return args.func(args)
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


if __name__ == "__main__":
    sys.exit(main())
