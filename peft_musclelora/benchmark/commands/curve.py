"""`musclelora curve`: CACC and ASR of a GA method and `clean-only` against the number of trusted clean rows.

The size of the trusted clean set is the strongest knob of gradient alignment, and LoRA trained on the trusted rows
alone a strong baseline. The command runs both for several trusted-row counts (`reference_split_size`: the same
seeded rows for both, removed from dev) and writes `curve.json`, `curve.md` and `curve.png` (one row of two panels
per attack: CACC and ASR against trusted rows, one line per method).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tqdm.auto import tqdm

from ..cells import refuse_replacing_finished_cells, run_cell, with_undefended
from ..reporting import curve_rows, curve_table, plot_curve
from .options import add_run_options, interruption_report, name_list, resolve_run, size_list

DEFAULT_SIZES = "32,96,200,400,800"
DEFAULT_CURVE_METHODS = "musclelora,clean-only"


def register(subparsers: Any) -> None:
    """Add the `curve` command."""
    parser = subparsers.add_parser(
        "curve",
        help="CACC/ASR against the number of trusted clean rows",
        description="Run musclelora and clean-only for several trusted-row counts (reference_split_size) and write "
        "curve.md, curve.json and curve.png. Finished cells are reused on re-runs.",
    )
    parser.add_argument("--attacks", type=name_list, default=name_list("addsent"), help="Comma-separated")
    parser.add_argument("--sizes", type=size_list, default=size_list(DEFAULT_SIZES), help="Trusted-row counts")
    parser.add_argument("--methods", type=name_list, default=name_list(DEFAULT_CURVE_METHODS), help="Comma-separated")
    add_run_options(parser, "musclelora-curve", "As for bench", "Skip the PNG")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run every (attack, size, method, seed) point, write curve.json / curve.md / curve.png; 1 if one failed."""
    if any(size < 1 for size in args.sizes):
        raise ValueError(f"--sizes must be positive trusted-row counts, got {args.sizes}.")
    bench, seeds = resolve_run(args, args.methods)
    plan = [(a, n, m, s) for a in args.attacks for n in args.sizes for m in args.methods for s in seeds]
    refuse_replacing_finished_cells(bench, with_undefended([(a, m, s, n) for a, n, m, s in plan]))
    cells: list[dict[str, Any]] = []
    with interruption_report(cells, len(plan), "curve"):
        for attack, size, method, seed in tqdm(plan, desc=f"curve ({args.preset})", disable=args.quiet):
            cell = run_cell(bench, attack, method, seed, trusted=size)
            cells.append({**cell, "attack": attack, "method": method, "trusted": size, "seed": seed})
    rows = curve_rows(cells)
    summary = {"bench_preset": args.preset, "model": bench.model_dir, "data": str(bench.shared.root)}
    summary.update({"sizes": args.sizes, "methods": args.methods, "seeds": seeds, "overrides": args.overrides})
    summary["rows"] = rows
    (bench.output_dir / "curve.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = curve_table(rows, args.preset, bench.model_dir, args.overrides)
    (bench.output_dir / "curve.md").write_text(table)
    print(table)
    if not args.no_plot:
        plot_curve(rows, bench.output_dir / "curve.png", args.preset)
    failed = sum(cell.get("status") == "error" for cell in cells)
    print(f"{len(cells)} cells ({failed} failed); results in {bench.output_dir}", file=sys.stderr)
    return 1 if failed else 0
