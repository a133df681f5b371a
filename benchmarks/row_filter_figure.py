"""The per-row fit-gap signal of finished `fit-gap` cells: clean vs poisoned training rows over the probe steps.

For each cell it reads `row_filter.json` (the filter's per-row decisions) and the training file's poison flags
(read here for the figure only, as in the cell's report) and draws, per probe step, the distribution of the rows'
percentile among the trusted rows of the same label, clean and poisoned apart, with the cut-offs the filter chose.

    python benchmarks/row_filter_figure.py runs/full-size-fitgap/cells/badnets/fit-gap/seed0 ... \
        --output docs/figures/row-filter-signal.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from peft_musclelora.benchmark.data import load_records
from peft_musclelora.plotting import _pyplot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", help="Finished fit-gap cell directories")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(args.cells), figsize=(4.2 * len(args.cells), 3.6), squeeze=False)
    for axis, cell in zip(axes[0], args.cells):
        cell = Path(cell)
        decisions = json.loads((cell / "row_filter.json").read_text())
        metrics = json.loads((cell / "metrics.json").read_text())
        train = load_records(metrics["data"]["train"]["source"])
        poisoned = np.array([record.poisoned for record in train.records])
        rows = decisions["rows"]
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
        axis.axvline(decisions["summary"]["high_cut"], color="tab:red", linestyle="--", linewidth=1)
        axis.set_title(f"{metrics.get('attack', cell.name)} (probe steps {','.join(map(str, steps))})", fontsize=9)
        axis.set_xlabel("percentile among trusted rows of the label")
        axis.set_yscale("log")
    axes[0][0].set_ylabel("density (log)")
    axes[0][-1].legend(fontsize=6, loc="upper center")
    figure.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=120)
    print(args.output)


if __name__ == "__main__":
    main()
