"""Do two finished row-filter cells of the same training set make the same per-row decisions? (session 21)

Prints, for each cell, how many rows each reason (`keep`, `fit-early`, `contradicted`) took, the number of rows whose
reason differs between the two, and whether every saved probe loss is equal. Session 21 used it to show that the
probes' train mode depended on whether a teacher was trained before them (a teacher-free cell against a teacher
cell of the same seed) and that the fix left the teacher presets' decisions as they were. Where both cells saved the
trusted teacher's predictions, says whether they are equal too (session 22: the teacher trained after the probes
predicts what it did before them). Where the teachers differ, says by how much (session 31: the teacher's steps in
length-sorted chunks); and for each cell, the seconds its filter, teacher, scoring and unlearning phase took, the
phase's guard, the step it kept and the bias refit after it.

    python benchmarks/compare_decisions.py runs-v6/s21-plain-badnets-s0/cells/badnets/fit-gap-unlearn/seed0 \
        runs-v6/s19-gated-badnets-s0/cells/badnets/fit-gap-unlearn/seed0
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", type=Path, nargs=2, help="two finished cell directories (or row_filter.json files)")
    args = parser.parse_args()
    reports = [json.loads((cell if cell.is_file() else cell / "row_filter.json").read_text()) for cell in args.cells]
    rows = [report["rows"] for report in reports]
    if len(rows[0]) != len(rows[1]):
        raise SystemExit(f"the cells hold {len(rows[0])} and {len(rows[1])} rows: not the same training set")
    for cell, cell_rows in zip(args.cells, rows):
        print(f"{cell}: {dict(collections.Counter(row['reason'] for row in cell_rows))}")
    differ = sum(a["reason"] != b["reason"] for a, b in zip(*rows))
    same_losses = all(a["losses"] == b["losses"] for a, b in zip(*rows))
    print(f"rows whose reason differs: {differ} of {len(rows[0])}; every probe loss equal: {same_losses}")
    teachers = [[row.get("teacher_log_probs") for row in cell_rows] for cell_rows in rows]
    if all(None not in teacher for teacher in teachers):
        print(f"every trusted-teacher prediction equal: {teachers[0] == teachers[1]}")
        if teachers[0] != teachers[1]:
            _print_teacher_difference(*teachers)
    else:
        print("trusted-teacher predictions: " + " / ".join("saved" if None not in t else "none" for t in teachers))
    for cell, report in zip(args.cells, reports):
        _print_phase(cell, report)


def _print_teacher_difference(first: list, second: list) -> None:
    """How far apart two teachers' log-probabilities are, and on how many rows their most likely class differs."""
    difference = [abs(a - b) for row_a, row_b in zip(first, second) for a, b in zip(row_a, row_b)]
    flips = sum(row_a.index(max(row_a)) != row_b.index(max(row_b)) for row_a, row_b in zip(first, second))
    print(
        f"trusted-teacher log-probabilities: mean absolute difference {sum(difference) / len(difference):.2g}, "
        f"largest {max(difference):.2g}; rows whose most likely class differs: {flips}"
    )


def _print_phase(cell: Path, report: dict) -> None:
    """The seconds the filter (of it the teacher and the scoring) and the unlearning phase took; the phase's guard
    (trusted-row accuracy by step), the step it kept, and the bias refit after it."""
    summary, phase = report["summary"], report.get("unlearning")
    seconds = {
        "filter": summary.get("seconds"),
        "teacher": summary.get("teacher_seconds"),
        "scoring": summary.get("scoring_seconds"),
        "phase": (phase or {}).get("seconds"),
    }
    print(f"{cell}: seconds " + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items() if value))
    if not phase or phase.get("skipped"):
        print(f"{cell}: no unlearning phase" + (f" ({phase['skipped']})" if phase else ""))
        return
    guard = ", ".join(f"{entry['step']}: {entry['accuracy']:.4f}" for entry in phase["guard"])
    offset = (report.get("bias_refit") or {}).get("offset")
    refit = "none" if offset is None else "[" + ", ".join(f"{value:+.2f}" for value in offset) + "] nats"
    print(f"{cell}: guard accuracy by step {{{guard}}}; kept step {phase['chosen_step']}; bias refit {refit}")


if __name__ == "__main__":
    main()
