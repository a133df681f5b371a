"""What the poison flags say of a finished `fit-gap` cell's per-row signal (issue 20's analysis; flags read here only).

Prints, from the cell's `row_filter.json` and its training file: the AUROC of each probe step's held-out loss (the
shallow probe's too), over all rows and within the target label, and of `low` / `high` (how well they separate
poisoned from clean rows; 0.5 = chance), the share of poisoned rows a cut at a
5 % clean-row false-positive rate would catch at each step (label-1 rows, where the poisoned rows are), the share of
poisoned and of clean rows with `low` below 0.025, and how many of the `fit-early` rows are poisoned. For a cell
made with the shallow probe, also each shallow-expert weight's product-of-experts gradient share: with the model
still at chance, a kept row's loss gradient under `CE(log_softmax(logits) + w * log p_shallow)` has the size
`1 - p_comb(label)`, `p_comb` proportional to `p_shallow ** w`; the report gives the poisoned rows' share of that
gradient mass over the kept rows and the mean per poisoned row and per clean row of the target label and of the
others, for the expert as it is and for the balanced expert (divided by its class prior,
`row_filter_shallow_expert_balanced`). For a cell made with the trusted teacher (`row_filter_teacher_mix`), how
well the teacher's disagreement separates the poisoned rows and how much of each group's target it moves.

    python benchmarks/row_filter_report.py runs/full-size-fitgap/cells/badnets/fit-gap/seed0
    python benchmarks/row_filter_report.py runs-v4/s15-evidence/expert-probe-stylebkd-s0-row_filter.json \
        --train ../shared/data/sst-2/poison/stylebkd/train-mixed-0.1.csv
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from peft_musclelora.benchmark.data import load_records
from peft_musclelora.shallow_probe import balanced_log_probs, expert_gradient_scale


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive row scores above a negative row), ties counted half (the Mann-Whitney statistic)."""
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]  # mid-ranks over ties
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def read_decisions(path: Path, train_file: Optional[Path] = None) -> tuple[dict, Any, np.ndarray, np.ndarray]:
    """`(row_filter.json, training records, poison flags, labels)` of a finished cell directory, or of a saved
    `row_filter.json` with the training file it was made for (`train_file`; a cell's own is in its metrics.json)."""
    decisions_path = path if path.is_file() else path / "row_filter.json"
    decisions = json.loads(decisions_path.read_text())
    if train_file is None:
        metrics = json.loads((decisions_path.parent / "metrics.json").read_text())
        train_file = Path(metrics["data"]["train"]["source"])
    train = load_records(train_file)
    return decisions, train, np.array([record.poisoned for record in train.records]), np.array(train.labels)


def cell_screen_arguments(description: str, cells_help: str) -> argparse.Namespace:
    """The command line of a screen over finished cells: the cell directories and the attack's target label."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("cells", type=Path, nargs="+", help=cells_help)
    parser.add_argument("--target-label", type=int, default=1, help="the attack's target label (the report's only)")
    return parser.parse_args()


def screened_cells(cells: list[Path]) -> Iterator[tuple[Path, dict, np.ndarray, np.ndarray]]:
    """Per finished cell: `(cell, row_filter.json, poison flags, labels)`."""
    for cell in cells:
        decisions, _, poisoned, labels = read_decisions(cell)
        yield cell, decisions, poisoned, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", type=Path, help="A finished fit-gap cell directory, or a saved row_filter.json")
    parser.add_argument("--train", type=Path, help="the training file, for a row_filter.json outside its cell")
    args = parser.parse_args()
    cell = args.cell
    decisions, _, poisoned, labels = read_decisions(cell, args.train)
    rows = decisions["rows"]
    losses = np.array([row["losses"] for row in rows])
    low, high = np.array([row["low"] for row in rows]), np.array([row["high"] for row in rows])
    reasons = np.array([row["reason"] for row in rows])
    report: dict = {"cell": str(cell), "rows": len(rows), "poisoned": int(poisoned.sum())}
    if not poisoned.any():
        print(json.dumps({**report, "note": "no poisoned rows"}))
        return
    target = labels == 1
    summary = decisions["summary"]
    steps = [f"step {step}" for step in summary["probe_steps"]]
    steps += [f"expert step {step}" for step in summary.get("expert_probe_steps") or []]
    if summary.get("shallow_probe"):
        steps.append(f"shallow probe ({summary['shallow_probe']})")  # scored as one more step, last
    percentiles = np.array([row["percentiles"] for row in rows])
    for step, column, percentile in zip(steps, losses.T, percentiles.T):
        fitted = -column  # a low loss is a well-fitted row
        cut = np.quantile(fitted[target & ~poisoned], 0.95)
        worse_cut = np.quantile(fitted[target & ~poisoned], 0.05)
        high_cut = summary["high_cut"]  # None: the contradicted side did not cut
        above = percentile > high_cut if high_cut is not None else np.zeros_like(percentile, dtype=bool)
        report[step] = {
            "auroc": round(auroc(fitted, poisoned), 3),
            # every poisoned row has the target label: within it, the signal is the trigger's, not the label's
            "auroc within label 1": round(auroc(fitted[target], poisoned[target]), 3),
            "poisoned caught at 5% clean FPR (label 1)": round(float((fitted[target & poisoned] > cut).mean()), 3),
            "poisoned caught at 5% clean FPR, fitted worse (label 1)": round(
                float((fitted[target & poisoned] < worse_cut).mean()), 3
            ),
            "above the high cut-off: poisoned, clean": [
                round(float(above[poisoned].mean()), 3),
                round(float(above[~poisoned].mean()), 3),
            ],
        }
    report["auroc low (small = poisoned)"] = round(auroc(-low, poisoned), 3)
    report["auroc high (large = poisoned)"] = round(auroc(high, poisoned), 3)
    report["low < 0.025: poisoned, clean"] = [
        round(float((low[poisoned] < 0.025).mean()), 3),
        round(float((low[~poisoned] < 0.025).mean()), 3),
    ]
    early = reasons == "fit-early"
    report["fit-early rows, poisoned share"] = [int(early.sum()), round(float(poisoned[early].mean()), 3)]
    report["dropped: clean share, poisoned recall"] = [
        round(float((reasons[~poisoned] != "keep").mean()), 3),
        round(float((reasons[poisoned] != "keep").mean()), 3),
    ]
    if "shallow_log_probs" in rows[0]:
        kept = reasons == "keep"
        log_probs = torch.tensor([row["shallow_log_probs"] for row in rows], dtype=torch.float64)
        predicted_target = (log_probs.argmax(dim=1) == 1).numpy()
        report["shallow probe: rows predicted as the target (clean target-label, clean other-label, poisoned)"] = [
            round(float(predicted_target[mask].mean()), 3)
            for mask in (~poisoned & target, ~poisoned & ~target, poisoned)
        ]
        # Soft down-weighting by the shallow step's percentile among the trusted rows of the same label (0: fitted
        # better than every trusted row), weight min(1, percentile / q): what share of the weight the poisoned keep.
        percentile = np.array([row["percentiles"][-1] for row in rows])
        report["shallow percentile: median of poisoned, of clean target-label rows"] = [
            round(float(np.median(percentile[poisoned])), 3),
            round(float(np.median(percentile[~poisoned & target])), 3),
        ]
        shares = {}
        for q in (0.05, 0.1, 0.25, 0.5):
            weight = np.minimum(1, percentile / q)
            shares[q] = round(float(weight[kept & poisoned].sum() / weight[kept].sum()), 3)
        report["shallow percentile weight min(1, percentile / q): q -> poisoned share of the kept rows' weight"] = (
            shares
        )
        report["shallow probe: mean prediction over the training rows (the class prior)"] = [
            round(float(value), 3) for value in log_probs.exp().mean(dim=0)
        ]
        experts = {"raw": log_probs, "balanced": balanced_log_probs(log_probs, log_probs.exp().mean(dim=0))}
        for name, expert in experts.items():
            key = (
                f"product-of-experts gradient at chance, {name} expert: weight -> poisoned share, mean poisoned, "
                "mean clean target-label, mean clean other-label"
            )
            report[key] = {
                weight: _expert_gradient_share(expert, labels, poisoned, kept, weight)
                for weight in SHALLOW_EXPERT_WEIGHTS
            }
    if "teacher_log_probs" in rows[0]:
        report.update(_teacher_report(rows, decisions["summary"]["teacher_mix"], labels, poisoned, target))
    print(json.dumps(report, indent=1))


def _teacher_report(
    rows: list, mix: Optional[float], labels: np.ndarray, poisoned: np.ndarray, target: np.ndarray
) -> dict:
    """How the trusted teacher (`row_filter_teacher_mix`, or the residual expert's) sees the poisoned rows: the AUROC
    of `1 - p_teacher(label)`, the mixed target's mass on the label per group (with a mix), and the share of rows
    whose label the teacher contradicts."""
    teacher = np.exp(np.array([row["teacher_log_probs"] for row in rows]))
    on_label = teacher[np.arange(len(rows)), labels]
    groups = (poisoned, ~poisoned & target, ~poisoned & ~target)
    report = {
        "teacher: auroc of 1 - p(label), all rows / within label 1": [
            round(auroc(1 - on_label, poisoned), 3),
            round(auroc(1 - on_label[target], poisoned[target]), 3),
        ],
        "teacher: share contradicting the label (poisoned, clean target-label, clean other-label)": [
            round(float((on_label[group] < 0.5).mean()), 3) for group in groups
        ],
    }
    if mix is not None:
        label_mass = 1 - mix + mix * on_label
        report["teacher: mean target mass on the label (poisoned, clean target-label, clean other-label)"] = [
            round(float(label_mass[group].mean()), 3) for group in groups
        ]
    return report


SHALLOW_EXPERT_WEIGHTS = (1.0, 2.0, 4.0, 6.0, 8.0, 16.0)


def _expert_gradient_share(
    log_probs: torch.Tensor, labels: np.ndarray, poisoned: np.ndarray, kept: np.ndarray, weight: float
) -> list[float]:
    label_log_probs = log_probs[torch.arange(len(labels)), torch.from_numpy(labels)]
    gradient = expert_gradient_scale(log_probs, label_log_probs, weight).numpy()
    share = gradient[kept & poisoned].sum() / gradient[kept].sum()
    target = labels == 1
    means = (
        gradient[kept & poisoned].mean(),
        gradient[kept & ~poisoned & target].mean(),
        gradient[kept & ~poisoned & ~target].mean(),
    )
    return [round(float(value), 3) for value in (share, *means)]


if __name__ == "__main__":
    main()
