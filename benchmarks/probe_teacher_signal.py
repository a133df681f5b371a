"""Could the fold probes teach in place of the trusted teacher? (session 23; flags read here only, no training)

The probes are trained on half the untrusted rows for up to 64 steps, many more rows than the trusted teacher's 400,
and each training row is scored out of fold. For finished `fit-gap-gated` / `fit-gap-evidence` cells (the teacher's
predictions and the probes' losses saved per row in `row_filter.json`), prints for the trusted teacher, each probe
step and the n-gram probe: the share of clean and of poisoned rows whose label it predicts (p(label) > 0.5; a good
teacher agrees with the clean rows and disagrees with the poisoned ones), and the AUROC of `1 - p(label)` for
poisoned against clean rows of the target label.

    python benchmarks/probe_teacher_signal.py runs-v6/s19-gated-stylebkd-s3/cells/stylebkd/fit-gap-unlearn/seed3
"""

from __future__ import annotations

import numpy as np
from row_filter_report import auroc, cell_screen_arguments, screened_cells


def main() -> None:
    args = cell_screen_arguments(__doc__.splitlines()[0], "finished cell directories with a trusted teacher")
    for cell, decisions, poisoned, labels in screened_cells(args.cells):
        rows = decisions["rows"]
        losses = np.array([row["losses"] for row in rows])
        steps = decisions["summary"]["probe_steps"]
        p_label = {"trusted teacher": np.exp([row["teacher_log_probs"][y] for row, y in zip(rows, labels)])}
        p_label |= {f"probe step {step}": np.exp(-losses[:, i]) for i, step in enumerate(steps)}
        if losses.shape[1] > len(steps):
            p_label["n-gram probe"] = np.exp(-losses[:, len(steps)])
        target = labels == args.target_label
        print(cell)
        for name, p in p_label.items():
            separation = auroc(1 - p[target], poisoned[target])
            print(
                f"  {name:16s} predicts the label of clean rows {np.mean(p[~poisoned] > 0.5):.3f}, of poisoned rows "
                f"{np.mean(p[poisoned] > 0.5):.3f}; AUROC of 1 - p(label), target label {separation:.3f}"
            )


if __name__ == "__main__":
    main()
