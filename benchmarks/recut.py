"""Recompute a finished `fit-gap` cell's keep/drop decisions under other cut-off settings, without probing again.

A cell's `row_filter.json` (made since the trusted rows' probe losses are saved in it, under `reference`) holds every
loss the decision rule reads, so [`decide_rows`] can be rerun on it with another `max_clean_drop`, with or without
extended tails, flagging contradicted rows or not. For each setting this prints the share of trusted rows the
rule flags, the share of the clean training rows it drops and the share of the poisoned ones (the poison flags are
read for this report only; the decisions never see them), per side (fit-early, contradicted). Training on the new
decisions is not simulated: what a cut does to clean accuracy and ASR needs a trained cell.

    python benchmarks/recut.py runs-v5/s18-ext3-stylebkd-s1/cells/stylebkd/fit-gap-unlearn/seed1 \
        --max-clean-drop 0.02 0.03 0.04
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from peft_musclelora.row_filter import decide_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from row_filter_report import read_decisions  # noqa: E402


def recut(
    report: dict, max_clean_drop: float, extend_tails: bool, flag_contradicted: bool = True
) -> tuple[list[str], float, str]:
    """The per-row reasons, the trusted-row flag rate and the tails (`tied`, `extended`, `extended on a tie`)
    `decide_rows` gives on the saved losses of `report`."""
    if "reference" not in report:
        raise ValueError("this row_filter.json has no `reference` losses (made before they were saved): probe again.")
    rows, saved = report["rows"], report["reference"]
    reference = torch.tensor(saved["losses"], dtype=torch.float64)
    folds, steps, _ = reference.shape
    train = torch.zeros(folds, steps, len(rows), dtype=torch.float64)
    for index, row in enumerate(rows):  # decide_rows reads each row's own fold only
        train[row["fold"], :, index] = torch.tensor(row["losses"], dtype=torch.float64)
    folds_of_rows = [row["fold"] for row in rows]
    row_groups, low_columns = _saved_rule(report)
    decisions = decide_rows(
        train,
        row_groups,
        folds_of_rows,
        reference,
        saved["groups"],
        max_clean_drop,
        low_columns,
        extend_tails,
        flag_contradicted,
    )
    return decisions.reasons, decisions.reference_flagged, decisions.tails


def _saved_rule(report: dict) -> tuple[list[int], list[bool]]:
    """The training rows' groups and the probe steps that count for `low`, as `decide_rows` read them. The first
    reports with `reference` (session 18's first cells) lack both: there a row's group is its `label` (class-label
    cells; the bench saves it per row) and every step counts for `low` but the expert probe steps."""
    saved = report["reference"]
    if "row_groups" in saved:
        return saved["row_groups"], saved["low_columns"]
    summary = report["summary"]
    plain, expert = len(summary["probe_steps"]), len(summary.get("expert_probe_steps") or [])
    steps = len(saved["losses"][0])
    low_columns = [True] * plain + [False] * expert + [True] * (steps - plain - expert)
    return [row["label"] for row in report["rows"]], low_columns


def _shares(reasons: np.ndarray):
    """`share(mask, reason)`: the percentage of the rows in `mask` given `reason` (nan for an empty mask)."""

    def share(mask: np.ndarray, reason: str) -> float:
        return round(100 * float((reasons[mask] == reason).mean()), 1) if mask.any() else float("nan")

    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", type=Path, nargs="+", help="Finished fit-gap cell directories")
    parser.add_argument("--max-clean-drop", type=float, nargs="+", default=[0.02, 0.03, 0.04])
    parser.add_argument("--tails", choices=["tied", "extended", "both"], default="both")
    parser.add_argument(
        "--contradicted", choices=["flag", "keep", "both"], default="flag", help="whether the high side cuts"
    )
    args = parser.parse_args()
    tails = {"tied": [False], "extended": [True], "both": [False, True]}[args.tails]
    sides = {"flag": [True], "keep": [False], "both": [True, False]}[args.contradicted]
    table = []
    for cell in args.cells:
        report, _, poisoned, _ = read_decisions(cell)
        for extend, flag_contradicted, bound in itertools.product(tails, sides, args.max_clean_drop):
            reasons, reference_flagged, scored_tails = recut(report, bound, extend, flag_contradicted)
            reasons = np.array(reasons)
            clean, bad = ~poisoned, poisoned
            share = _shares(reasons)
            table.append(
                {
                    "cell": str(cell),
                    "tails": scored_tails,
                    "contradicted": "flagged" if flag_contradicted else "kept",
                    "max_clean_drop": bound,
                    "trusted flagged %": round(100 * reference_flagged, 1),
                    "clean dropped %": round(100 * float((reasons[clean] != "keep").mean()), 1),
                    "clean fit-early / contradicted %": [share(clean, "fit-early"), share(clean, "contradicted")],
                    "poisoned recall %": round(100 * float((reasons[bad] != "keep").mean()), 1) if bad.any() else None,
                    "poisoned fit-early / contradicted %": [share(bad, "fit-early"), share(bad, "contradicted")],
                }
            )
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
