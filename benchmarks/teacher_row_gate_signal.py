"""Where would a fixed per-row gate on the trusted teacher put its pull? (session 22; flags read here only)

For finished `fit-gap-evidence` / `fit-gap-gated` cells (the trusted teacher and the n-gram probe saved per row),
prints the teacher's pull on the kept rows, `1 - p_teacher(label)` summed over the poisoned and over the clean rows
(the flags are read for this report only), as trained and with the pull given only to the rows whose label is the
shallow probe's most likely class (`row_filter_teacher_row_gate="shallow_supports"`), and within the kept rows of the
target label that the teacher contradicts, the AUROC of the shallow probe's p(label) for poisoned against clean.

    python benchmarks/teacher_row_gate_signal.py runs-v6/s19-gated-stylebkd-s3/cells/stylebkd/fit-gap-unlearn/seed3
"""

from __future__ import annotations

import numpy as np
import torch
from row_filter_report import auroc, cell_screen_arguments, screened_cells

from peft_musclelora.shallow_probe import shallow_support


def main() -> None:
    args = cell_screen_arguments(__doc__.splitlines()[0], "finished cell directories with a teacher and the probe")
    for cell, decisions, poisoned, labels in screened_cells(args.cells):
        rows = decisions["rows"]
        kept = np.array([row["reason"] == "keep" for row in rows])
        shallow = torch.tensor([row["shallow_log_probs"] for row in rows])
        teacher = np.exp(np.array([row["teacher_log_probs"][label] for row, label in zip(rows, labels)]))
        gate = shallow_support(shallow, torch.tensor(labels)).numpy()
        contradicted = kept & (labels == args.target_label) & (teacher < 0.5)
        p_label = np.exp(shallow.numpy()[np.arange(len(rows)), labels])
        print(
            f"{cell}: {contradicted.sum()} kept target-label rows the teacher contradicts "
            f"({poisoned[contradicted].mean():.2f} poisoned); AUROC of the probe's p(label) there "
            f"{auroc(p_label[contradicted], poisoned[contradicted]):.3f}; gate open on {gate[kept].mean():.3f} of kept"
        )
        for name, weight in (("as trained", np.ones_like(gate)), ("shallow_supports", gate)):
            pull = (1 - teacher) * kept * weight
            poisoned_pull, clean_pull = pull[poisoned].sum(), pull[~poisoned].sum()
            print(f"  {name:17s} teacher pull: poisoned rows {poisoned_pull:7.1f}, clean rows {clean_pull:7.1f}")


if __name__ == "__main__":
    main()
