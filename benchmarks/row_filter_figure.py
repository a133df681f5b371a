"""The per-row fit-gap signal of finished `fit-gap` cells: clean vs poisoned training rows over the probe steps.

For each cell it reads `row_filter.json` (the filter's per-row decisions) and the training file's poison flags
(read here for the figure only, as in the cell's report) and draws, per probe step, the distribution of the rows'
percentile among the trusted rows of the same label, clean and poisoned apart, with the cut-offs the filter chose.
With `--shallow-expert-weight W` (cells made with the shallow probe) it draws instead the gradient each row gives a
model at chance under the product of experts at weight W (`shallow_probe.expert_gradient_scale`), clean and
poisoned apart: what the shallow expert leaves the adapter to learn from each row. With `--teacher` (cells made
with `row_filter_teacher_mix`) it draws the trusted teacher's doubt about each row's label, 1 - p_teacher(label)
(`shallow_probe.label_doubt`), clean and poisoned apart: with the mix 0.5, half of it is the share of its label's
target a row gives up at each step the teacher-mix gate opens.

    python benchmarks/row_filter_figure.py runs/full-size-fitgap/cells/badnets/fit-gap/seed0 ... \
        --output docs/figures/row-filter-signal.png
    python benchmarks/row_filter_figure.py \
        runs/s10-poe-l6-{badnets,addsent,stylebkd,synbkd}/cells/*/fit-gap-unlearn/seed0 --shallow-expert-weight 6 \
        --output docs/figures/shallow-expert-gradient.png
    python benchmarks/row_filter_figure.py \
        runs-v5/s16-mixcontra-l4-{badnets,addsent,stylebkd,synbkd}-s2/cells/*/fit-gap-unlearn/seed2 --teacher \
        --output docs/figures/teacher-doubt.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from peft_musclelora.benchmark.data import load_records
from peft_musclelora.plotting import pyplot, save_figure
from peft_musclelora.shallow_probe import expert_gradient_scale, label_doubt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", help="Finished fit-gap cell directories")
    parser.add_argument("--output", required=True)
    parser.add_argument("--shallow-expert-weight", type=float, default=None)
    parser.add_argument("--teacher", action="store_true", help="Draw the trusted teacher's doubt about each label")
    args = parser.parse_args()
    plt = pyplot("The row-filter figure")
    figure, axes = plt.subplots(1, len(args.cells), figsize=(4.2 * len(args.cells), 3.6), squeeze=False)
    for axis, cell in zip(axes[0], args.cells):
        cell = Path(cell)
        decisions = json.loads((cell / "row_filter.json").read_text())
        metrics = json.loads((cell / "metrics.json").read_text())
        train = load_records(metrics["data"]["train"]["source"])
        poisoned = np.array([record.poisoned for record in train.records])
        rows = decisions["rows"]
        if args.teacher:
            _draw_shares(axis, _teacher_doubt(rows, np.array(train.labels)), poisoned)
            axis.set_xlabel("teacher's doubt about the label, 1 - p_teacher(label)")
            axis.set_title(f"{metrics.get('attack', cell.name)}, trusted teacher", fontsize=9)
            continue
        if args.shallow_expert_weight is not None:
            _draw_expert_gradient(axis, rows, np.array(train.labels), poisoned, args.shallow_expert_weight)
            axis.set_title(f"{metrics.get('attack', cell.name)}, shallow expert weight {args.shallow_expert_weight:g}")
            continue
        steps = decisions["summary"]["probe_steps"]
        low = np.array([row["low"] for row in rows])
        high = np.array([row["high"] for row in rows])
        for values, name, colour in ((low, "low (min over steps)", "tab:blue"), (high, "high (max)", "tab:red")):
            axis.hist(
                values[~poisoned],
                bins=40,
                range=(0, 1),
                alpha=0.35,
                density=True,
                color=colour,
                label=f"clean, {name}",
            )
            axis.hist(
                values[poisoned],
                bins=40,
                range=(0, 1),
                histtype="step",
                linewidth=1.6,
                density=True,
                color=colour,
                label=f"poisoned, {name}",
            )
        axis.axvline(decisions["summary"]["low_cut"], color="tab:blue", linestyle="--", linewidth=1)
        if decisions["summary"]["high_cut"] is not None:  # None: the contradicted side did not cut
            axis.axvline(decisions["summary"]["high_cut"], color="tab:red", linestyle="--", linewidth=1)
        axis.set_title(f"{metrics.get('attack', cell.name)} (probe steps {','.join(map(str, steps))})", fontsize=9)
        axis.set_xlabel("percentile among trusted rows of the label")
        axis.set_yscale("log")
    shares = args.shallow_expert_weight is not None or args.teacher
    axes[0][0].set_ylabel("share of rows (log)" if shares else "density (log)")
    axes[0][-1].legend(fontsize=6, loc="upper center")
    save_figure(figure, args.output)
    print(args.output)


def _draw_expert_gradient(axis, rows: list[dict], labels: np.ndarray, poisoned: np.ndarray, weight: float) -> None:
    log_probs = torch.tensor([row["shallow_log_probs"] for row in rows], dtype=torch.float64)
    label_log_probs = log_probs[torch.arange(len(rows)), torch.from_numpy(labels)]
    _draw_shares(axis, expert_gradient_scale(log_probs, label_log_probs, weight).numpy(), poisoned)
    axis.set_xlabel("gradient left to the adapter, 1 - p_expert(label)")


def _teacher_doubt(rows: list[dict], labels: np.ndarray) -> np.ndarray:
    teacher = torch.tensor([row["teacher_log_probs"] for row in rows], dtype=torch.float64)
    return label_doubt(teacher, torch.from_numpy(labels)).numpy()


def _draw_shares(axis, values: np.ndarray, poisoned: np.ndarray) -> None:
    """Histograms of per-row `values` in [0, 1], clean and poisoned rows apart, each as shares of its own rows."""
    for group, name, style in ((~poisoned, "clean", {"alpha": 0.4}), (poisoned, "poisoned", {"histtype": "step"})):
        weights = np.full(group.sum(), 1.0 / group.sum())
        axis.hist(
            values[group],
            bins=40,
            range=(0, 1),
            weights=weights,
            label=f"{name} (mean {values[group].mean():.2f})",
            **style,
        )
    axis.set_yscale("log")
    axis.legend(fontsize=6, loc="upper right")


if __name__ == "__main__":
    main()
