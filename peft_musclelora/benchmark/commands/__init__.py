"""The `musclelora` commands, one module each with `register(subparsers)` and `run(args) -> int`.

Adding a command is one module here plus one line in [`COMMANDS`].
"""

from __future__ import annotations

from types import ModuleType

from . import analyze, bench, curve, evaluate, export_model, instruct, poison, presets, train

#: The commands in the order `musclelora --help` lists them.
COMMANDS: tuple[ModuleType, ...] = (train, analyze, evaluate, bench, curve, poison, instruct, export_model, presets)

__all__ = ["COMMANDS"]
