"""Post-hoc class-bias correction of finished cells, fitted on the cell's own trusted rows (session 12's analysis).

Hypothesis being tested: a product of experts with a sharpened expert (`row_filter_shallow_expert_weight` 6) leaves
the model alone biased against the classes the expert favours (on the poisoned sets, the target: their false-target
rate falls from LoRA's 12-14 % to 7-9 %), and that shift, not a lost feature, is the clean accuracy it costs. The
check: refit only the classifier's output bias on the `reference_split_size` trusted clean rows the defense already
holds (seeded exactly as the trainer draws them), by maximum likelihood, and score the test sets again. The poison
flags are not read. Prints, per cell, CACC / ASR / false-target rate before and after and the fitted bias.

    python benchmarks/bias_correction.py runs/s10-poe-l6-stylebkd-s2/cells/stylebkd/fit-gap-unlearn/seed2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from peft_musclelora.benchmark.builders import load_cell
from peft_musclelora.benchmark.data import load_records
from peft_musclelora.benchmark.metrics import attack_success_rate, clean_accuracy, false_target_rate
from peft_musclelora.benchmark.splits import split_trusted


def logits_of(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 128) -> torch.Tensor:
    """The model's logits for `texts`, `(rows, classes)`, in float32."""
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(
                texts[start : start + batch_size],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            out.append(model(**encoded).logits.float())
    return torch.cat(out)


def fit_bias(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The per-class offset (the first class's fixed at 0) maximising the likelihood of `labels`."""
    free = torch.zeros(logits.size(1) - 1, requires_grad=True)
    optimizer = torch.optim.LBFGS([free], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits + torch.cat([torch.zeros(1), free]), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return torch.cat([torch.zeros(1), free.detach()])


def scores(clean: torch.Tensor, poison: torch.Tensor, clean_labels: list[int], target: int) -> dict[str, float]:
    clean_pred, poison_pred = clean.argmax(1).tolist(), poison.argmax(1).tolist()
    return {
        "cacc": round(100 * clean_accuracy(clean_pred, clean_labels), 1),
        "asr": round(100 * attack_success_rate(poison_pred, target), 1),
        "ftr": round(100 * false_target_rate(clean_pred, clean_labels, target), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", type=Path, help="finished bench or train cell directories")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for cell in args.cells:
        metrics = json.loads((cell / "metrics.json").read_text())
        model, tokenizer, info = load_cell(cell / "adapter")
        attack = metrics.get("attack") or cell.parts[-3]
        files = args.data / "sst-2" / "poison" / attack
        training = metrics["preset"]["training"]
        size = training["ga"]["reference_split_size"]
        trusted, _ = split_trusted(
            load_records(files / "dev-clean.csv"), size, metrics["seed"], training["ga"]["reference_stratify"]
        )
        test_clean, test_poison = load_records(files / "test-clean.csv"), load_records(files / "test-poison.csv")
        max_length, target = info["max_length"], info["target_label"]
        trusted_logits = logits_of(model, tokenizer, trusted.texts, max_length)
        clean_logits = logits_of(model, tokenizer, test_clean.texts, max_length)
        poison_logits = logits_of(model, tokenizer, test_poison.texts, max_length)
        bias = fit_bias(trusted_logits, torch.tensor(trusted.labels))
        before = scores(clean_logits, poison_logits, test_clean.labels, target)
        after = scores(clean_logits + bias, poison_logits + bias, test_clean.labels, target)
        print(
            json.dumps(
                {
                    "cell": str(cell),
                    "trusted_rows": len(trusted),
                    "bias": bias.tolist(),
                    "before": before,
                    "after": after,
                }
            )
        )


if __name__ == "__main__":
    main()
