"""How well a finished cell's model, used as a detector, separates the poisoned training rows (session 12's analysis).

A model that learned the clean task and less of the backdoor than the undefended one (say, the product of experts)
disagrees with a relabelled row's label. This scores every training row of the cell's attack by the model's
p(label), its class bias first refitted on the cell's trusted rows (as `bias_correction.py` does), and prints the
AUROC of `1 - p(label)` for poisoned against clean rows within the target label (every poisoned row has it), and what
a cut that flags 2 % of the trusted target-label rows (the row filter's share per tail) would flag: its share of the
clean and of the poisoned training rows. The poison flags are read for the report only.

    python benchmarks/detector_signal.py runs/s10-poe-l6-stylebkd-s2/cells/stylebkd/fit-gap-unlearn/seed2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bias_correction import TrustedCell, fit_bias, parse_cell_arguments  # noqa: E402
from row_filter_report import auroc  # noqa: E402

from peft_musclelora.benchmark.data import load_records  # noqa: E402


def label_probs(logits: torch.Tensor, labels: list[int]) -> np.ndarray:
    """Each row's probability of its label under `logits`."""
    probs = torch.softmax(logits, dim=-1)
    return probs[torch.arange(len(labels)), torch.tensor(labels)].numpy()


def main() -> None:
    args = parse_cell_arguments(__doc__)
    for path in args.cells:
        cell = TrustedCell.load(path, args.data)
        trusted = cell.trusted
        train = load_records(cell.files / "train-mixed-0.1.csv")
        target = cell.info["target_label"]
        trusted_logits = cell.logits(trusted.texts)
        bias = fit_bias(trusted_logits, torch.tensor(trusted.labels))
        train_p = label_probs(cell.logits(train.texts) + bias, train.labels)
        trusted_p = label_probs(trusted_logits + bias, trusted.labels)
        labels, poisoned = np.array(train.labels), np.array([r.poisoned for r in train.records])
        in_target = labels == target
        cut = np.quantile(trusted_p[np.array(trusted.labels) == target], 0.02)
        flagged = train_p < cut
        print(
            json.dumps(
                {
                    "cell": str(path),
                    "auroc within the target label": round(auroc(1 - train_p[in_target], poisoned[in_target]), 3),
                    "cut (p(label) below)": round(float(cut), 4),
                    "flagged: clean share, poisoned recall": [
                        round(float(flagged[~poisoned].mean()), 3),
                        round(float(flagged[poisoned].mean()), 3),
                    ],
                }
            )
        )


if __name__ == "__main__":
    main()
