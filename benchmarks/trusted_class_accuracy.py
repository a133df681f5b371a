"""Per-class accuracy of finished cells on their own trusted rows, beside their test false-target rate.

Asks whether the 400 trusted rows a defense holds can see the class balance of the model it trained: a cell whose
model leans towards the target label on the test set (a high false-target rate: clean rows of the other label
predicted as the target) should also get the trusted rows of the other label wrong more often. Session 18 used it
on cells before and after the unlearning phase (a `row_filter_unlearn=false` cell with the same row decisions is the
state before it). The trusted rows are drawn exactly as the cell's trainer drew them; no poison flag is read.

    python benchmarks/trusted_class_accuracy.py runs-v5/s16-mixcontra-l4-addsent-s0/cells/addsent/fit-gap-unlearn/seed0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bias_correction import TrustedCell  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", type=Path, nargs="+", help="Finished cell directories (with adapter/)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="The shared data root")
    args = parser.parse_args()
    for cell in args.cells:
        loaded = TrustedCell.load(cell, args.data)
        labels = torch.tensor(loaded.trusted.labels)
        predicted = loaded.logits(loaded.trusted.texts).argmax(-1)
        per_class = {
            int(label): round(100 * float((predicted[labels == label] == label).double().mean()), 1)
            for label in labels.unique()
        }
        metrics = loaded.metrics
        print(
            json.dumps(
                {
                    "cell": str(cell),
                    "trusted accuracy": round(100 * float((predicted == labels).double().mean()), 1),
                    "trusted accuracy per class": per_class,
                    "test cacc": round(100 * metrics["cacc"], 1),
                    "test false-target rate": round(100 * metrics["false_target_rate"], 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
