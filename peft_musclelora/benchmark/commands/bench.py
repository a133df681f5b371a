"""`musclelora bench`: every (attack, method, seed) cell on the shared data, then the table and the bar chart."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tqdm.auto import tqdm

from ..cells import refuse_replacing_finished_cells, run_cell, with_undefended
from ..methods import method_names
from ..presets import PRESETS
from ..reporting import aggregate, data_note, markdown_table, plot
from .options import add_run_options, interruption_report, name_list, resolve_run

DEFAULT_ATTACKS = "badnets,addsent,stylebkd,synbkd"
DEFAULT_METHODS = "lora,musclelora"
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
PLOT_FILE = "results.png"
SUMMARY_CELL_KEYS = ("attack", "method", "seed", "status", "reused", "error", "reason", "cacc", "asr", "num_labels")


def register(subparsers: Any) -> None:
    """Add the `bench` command."""
    parser = subparsers.add_parser(
        "bench",
        help="Run attacks x methods x seeds on the shared data",
        description="Train and evaluate every (attack, method, seed) cell; finished cells are reused on re-runs.",
    )
    parser.add_argument("--attacks", type=name_list, default=name_list(DEFAULT_ATTACKS), help="Comma-separated")
    others = [name for name in method_names() if name not in PRESETS]
    parser.add_argument(
        "--methods",
        type=name_list,
        default=name_list(DEFAULT_METHODS),
        help="Comma-separated: presets ("
        + ",".join(PRESETS)
        + "), baselines and defenses ("
        + ",".join(others)
        + "; options with --set <defense>.<field>=value)",
    )
    add_run_options(
        parser,
        "musclelora-bench",
        "quick: 2 epochs on a seeded 2000-row subsample (300 test rows); full: the method presets",
        "Skip the bar chart",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the plan, write results.json / results.md / results.png; 1 if a cell failed."""
    started = time.perf_counter()
    bench, seeds = resolve_run(args, args.methods)
    plan = [(a, m, s) for a in args.attacks for m in args.methods for s in seeds]
    refuse_replacing_finished_cells(bench, with_undefended([(a, m, s, None) for a, m, s in plan]))
    cells: list[dict[str, Any]] = []
    with interruption_report(cells, len(plan), "bench"):
        for attack, method, seed in tqdm(plan, desc=f"bench ({args.preset})", disable=args.quiet):
            cells.append(run_cell(bench, attack, method, seed))
    rows = aggregate(cells)
    summary = {
        "bench_preset": args.preset,
        "model": bench.model_dir,
        "data": str(bench.shared.root),
        "task": bench.shared.task,
        "target_label": bench.target_label,
        "attacks": args.attacks,
        "methods": args.methods,
        "seeds": seeds,
        "overrides": args.overrides,
        "rows": rows,
        "cells": [{key: cell.get(key) for key in SUMMARY_CELL_KEYS} for cell in cells],
    }
    (bench.output_dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    note = data_note(bench.shared.task, cells, bench.target_label)
    table = markdown_table(rows, args.preset, bench.model_dir, args.overrides, note)
    (bench.output_dir / TABLE_FILE).write_text(table)
    print(table)
    if not args.no_plot:
        plot(rows, bench.output_dir / PLOT_FILE, args.preset)
    failed = sum(cell.get("status") == "error" for cell in cells)
    reused = sum(bool(cell.get("reused")) for cell in cells)
    wall = time.perf_counter() - started
    print(
        f"{len(cells)} cells ({reused} reused, {failed} failed) in {wall / 60:.1f} min wall time; results in "
        f"{bench.output_dir}",
        file=sys.stderr,
    )
    return 1 if failed else 0
