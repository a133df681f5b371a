"""`python -m peft_musclelora.benchmark.analyze`: the `analyze` command on its own (it lives in
`peft_musclelora.benchmark.commands.analyze`, like every command)."""

from __future__ import annotations

from .commands.analyze import add_analyze_parser, main, run_analyze

__all__ = ["add_analyze_parser", "main", "run_analyze"]

if __name__ == "__main__":
    raise SystemExit(main())
