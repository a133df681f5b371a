"""Post-hoc class-bias correction of finished cells, fitted on the cell's own trusted rows (session 12's analysis).

Hypothesis being tested: a product of experts with a sharpened expert (`row_filter_shallow_expert_weight` 6) leaves
the model alone biased against the classes the expert favours (on the poisoned sets, the target: their false-target
rate falls from LoRA's 12-14 % to 7-9 %), and that shift, not a lost feature, is the clean accuracy it costs. The
check: refit only the classifier's output bias on the `reference_split_size` trusted clean rows the defense already
holds (seeded exactly as the trainer draws them), by maximum likelihood, and score the test sets again. The poison
flags are not read. Prints, per cell, CACC / ASR / false-target rate before and after and the fitted bias. For a
cell trained with `row_filter_refit_bias=true` (whose saved model is already refitted) the saved offset is undone
first, so "before" is the model as trained and "after" the model as saved. Last, per attack (a `musclelora train`
cell on unpoisoned rows is `unpoisoned`), the mean and spread over the cells given of each column, before and after.

    python benchmarks/bias_correction.py runs/s10-poe-l6-stylebkd-s2/cells/stylebkd/fit-gap-unlearn/seed2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peft_musclelora.benchmark.builders import load_cell
from peft_musclelora.benchmark.data import LoadedData, load_records
from peft_musclelora.benchmark.evaluation import predict_logits
from peft_musclelora.benchmark.metrics import attack_success_rate, clean_accuracy, false_target_rate
from peft_musclelora.benchmark.splits import split_trusted
from peft_musclelora.bias_refit import fit_class_offset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_summary import group_of_train_cell, mean_std  # noqa: E402

DEFAULT_TRUSTED_ROWS = 400  # the row filters' and clean-only's trusted rows, for a cell whose preset names none


def logits_of(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
    """The model's logits for `texts`, `(rows, classes)`, in float32."""
    return predict_logits(model, tokenizer, texts, batch_size=128, max_length=max_length, progress=False)


@dataclass
class TrustedCell:
    """A finished cell's model and the data its defense saw: the attack's files and the trusted rows of its seed."""

    metrics: dict[str, Any]
    model: Any
    tokenizer: Any
    info: dict[str, Any]
    files: Path
    trusted: LoadedData

    @classmethod
    def load(cls, cell: Path, data: Path) -> TrustedCell:
        metrics = json.loads((cell / "metrics.json").read_text())
        model, tokenizer, info = load_cell(cell / "adapter")
        # A bench cell names its attack; a `musclelora train` cell's files sit beside its training file.
        attack = metrics.get("attack")
        files = data / "sst-2" / "poison" / attack if attack else Path(metrics["data"]["train"]["source"]).parent
        ga = metrics["preset"]["training"]["ga"]
        trusted, _ = split_trusted(
            load_records(files / "dev-clean.csv"),
            ga["reference_split_size"] or DEFAULT_TRUSTED_ROWS,
            metrics["seed"],
            ga["reference_stratify"],
        )
        return cls(metrics, model, tokenizer, info, files, trusted)

    def logits(self, texts: list[str]) -> torch.Tensor:
        return logits_of(self.model, self.tokenizer, texts, self.info["max_length"])


def fit_bias(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The per-class offset (the first class's fixed at 0) maximising the likelihood of `labels`: the library's
    `row_filter_refit_bias` fit ([`peft_musclelora.bias_refit.fit_class_offset`]), as float32."""
    return fit_class_offset(logits, labels).float()


def scores(clean: torch.Tensor, poison: torch.Tensor, clean_labels: list[int], target: int) -> dict[str, float]:
    clean_pred, poison_pred = clean.argmax(1).tolist(), poison.argmax(1).tolist()
    return {
        "cacc": round(100 * clean_accuracy(clean_pred, clean_labels), 1),
        "asr": round(100 * attack_success_rate(poison_pred, target), 1),
        "ftr": round(100 * false_target_rate(clean_pred, clean_labels, target), 1),
    }


def parse_cell_arguments(doc: str) -> argparse.Namespace:
    """`cells` (finished bench cell directories) and `--data`, for the scripts that load cells with their trusted
    rows; one thread, as beside the benchmark lanes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("cells", nargs="+", type=Path, help="finished bench cell directories")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    torch.set_num_threads(1)
    return parser.parse_args()


def print_group_means(results: list[tuple[str, dict[str, Any]]]) -> None:
    """One JSON line per attack: the mean ± sample standard deviation of each score before and after the refit."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for group, result in results:
        groups[group].append(result)
    for group, cells in groups.items():
        means = {
            side: {key: mean_std([cell[side][key] for cell in cells]) for key in cells[0][side]}
            for side in ("before", "after")
        }
        print(json.dumps({"attack": group, "cells": len(cells), **means}, ensure_ascii=False))


def main() -> None:
    args = parse_cell_arguments(__doc__)
    results = []
    for path in args.cells:
        cell = TrustedCell.load(path, args.data)
        test_clean = load_records(cell.files / "test-clean.csv")
        test_poison = load_records(cell.files / "test-poison.csv")
        target = cell.info["target_label"]
        # A cell trained with row_filter_refit_bias saved its model refitted: undo the saved offset first, so that
        # "before" is always the model as trained and "after" the model with the trusted refit.
        saved = torch.tensor(cell.metrics.get("row_filter", {}).get("bias_offset") or [0.0])
        clean_logits, poison_logits = cell.logits(test_clean.texts) - saved, cell.logits(test_poison.texts) - saved
        bias = fit_bias(cell.logits(cell.trusted.texts) - saved, torch.tensor(cell.trusted.labels))
        before = scores(clean_logits, poison_logits, test_clean.labels, target)
        after = scores(clean_logits + bias, poison_logits + bias, test_clean.labels, target)
        result = {"cell": str(path), "trusted_rows": len(cell.trusted), "bias": bias.tolist(), "before": before,
                  "after": after}  # fmt: skip
        print(json.dumps(result))
        results.append((cell.metrics.get("attack") or group_of_train_cell(cell.metrics, path), result))
    print_group_means(results)


if __name__ == "__main__":
    main()
