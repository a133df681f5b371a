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

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bias_correction import fit_bias, logits_of  # noqa: E402
from row_filter_report import auroc  # noqa: E402

from peft_musclelora.benchmark.builders import load_cell  # noqa: E402
from peft_musclelora.benchmark.data import load_records  # noqa: E402
from peft_musclelora.benchmark.splits import split_trusted  # noqa: E402


def label_probs(logits: torch.Tensor, labels: list[int]) -> np.ndarray:
    """Each row's probability of its label under `logits`."""
    probs = torch.softmax(logits, dim=-1)
    return probs[torch.arange(len(labels)), torch.tensor(labels)].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", type=Path, help="finished bench cell directories")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for cell in args.cells:
        metrics = json.loads((cell / "metrics.json").read_text())
        model, tokenizer, info = load_cell(cell / "adapter")
        files = args.data / "sst-2" / "poison" / (metrics.get("attack") or cell.parts[-3])
        ga = metrics["preset"]["training"]["ga"]
        trusted, _ = split_trusted(
            load_records(files / "dev-clean.csv"), ga["reference_split_size"] or 400, metrics["seed"],
            ga["reference_stratify"],
        )  # fmt: skip
        train = load_records(files / "train-mixed-0.1.csv")
        target, max_length = info["target_label"], info["max_length"]
        trusted_logits = logits_of(model, tokenizer, trusted.texts, max_length)
        bias = fit_bias(trusted_logits, torch.tensor(trusted.labels))

        train_p = label_probs(logits_of(model, tokenizer, train.texts, max_length) + bias, train.labels)
        trusted_p = label_probs(trusted_logits + bias, trusted.labels)
        labels, poisoned = np.array(train.labels), np.array([r.poisoned for r in train.records])
        in_target = labels == target
        cut = np.quantile(trusted_p[np.array(trusted.labels) == target], 0.02)
        flagged = train_p < cut
        print(
            json.dumps(
                {
                    "cell": str(cell),
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
