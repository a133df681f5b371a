"""One benchmark cell of the shared poisoned SST-2, trained as `musclelora train` trains it, for screening scripts
that hook into the run (`weight_average_screen.py`, `phase_trajectory.py`)."""

from __future__ import annotations

import argparse
from typing import Any

from peft_musclelora.benchmark import runner


def train_attack_cell(args: argparse.Namespace) -> dict[str, Any]:
    """Train `args.method` on `<args.data_dir>/<args.attack>/<args.train_file>` with the attack's clean dev and test
    files, seed `args.seed` and `args.overrides`, into `<args.output_dir>/cell`; the cell's metrics."""
    data = args.data_dir / args.attack
    return runner.train_cell(
        args.method,
        train=data / args.train_file,
        dev=data / "dev-clean.csv",
        output_dir=args.output_dir / "cell",
        seed=args.seed,
        test_clean=data / "test-clean.csv",
        test_poison=data / "test-poison.csv",
        progress=False,
        overrides=args.overrides,
    )
