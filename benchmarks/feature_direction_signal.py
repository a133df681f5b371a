"""Can a backdoor direction be projected out of a finished cell's pooled features? (session 20; flags for the report)

A cell that defends a paraphrase attack partly by a class shift (`fit-gap-gated` on StyleBkd: the bias refit on its
trusted rows brings back 8-9 points of ASR) still encodes the trigger somewhere. If the trigger had its own direction
in the classifier's input, removing it (and refitting the output bias on the trusted rows) would lower ASR without
the shift. For each cell this estimates candidate directions from what the defense holds, never the poison flags:

- `spectral`: the top right-singular vector of the kept target-label training rows' centred features (spectral
  signatures, Tran et al. 2018);
- `suspects-trusted`: the mean of the *suspects* (kept target-label rows the trusted teacher gives p(target) < 0.5
  and the shallow n-gram probe > 0.5: its words claim the target, its content does not) minus the trusted
  target-label rows' mean; `suspects-trusted-other`: the same against the trusted rows of the other labels;
- `spectral-suspects`, `spectral-suspects-2`: the top two singular vectors within the suspects;
- `untrusted-trusted`: the kept target-label rows' mean minus the trusted target-label rows' mean.

Each direction is projected out of every feature (about the trusted target-label mean), the cell's classifier is
applied, and CACC / ASR / false-target rate are printed as projected and with the output bias refitted on the
trusted rows, beside the AUROC of the projection for poisoned against clean target-label rows (and within the
suspects). The cell's `row_filter.json` must hold the teacher's and the probe's per-row log-probabilities
(`row_filter_teacher_mix` with `row_filter_shallow_probe`).

    OMP_NUM_THREADS=1 python benchmarks/feature_direction_signal.py \
        runs-v6/s19-gated-stylebkd-s3/cells/stylebkd/fit-gap-unlearn/seed3
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bias_correction import TrustedCell, fit_bias, parse_cell_arguments, scores  # noqa: E402
from row_filter_report import auroc  # noqa: E402

from peft_musclelora.benchmark.data import load_records  # noqa: E402


@torch.no_grad()
def pooled_features(cell: TrustedCell, texts: list[str]) -> tuple[torch.Tensor, torch.nn.Module]:
    """The classifier's input for `texts` `(rows, hidden)` and the classifier module itself."""
    head = cell.model.base_model.model.classifier
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach().float()))
    try:
        cell.logits(texts)
    finally:
        hook.remove()
    return torch.cat(captured), head


def candidate_directions(
    kept_target: torch.Tensor, suspects: torch.Tensor, trusted_target: torch.Tensor, trusted_other: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each candidate backdoor direction, as a unit vector."""
    _, _, kept_axes = torch.linalg.svd(kept_target - kept_target.mean(0), full_matrices=False)
    _, _, suspect_axes = torch.linalg.svd(suspects - suspects.mean(0), full_matrices=False)
    directions = {
        "spectral": kept_axes[0],
        "suspects-trusted": suspects.mean(0) - trusted_target.mean(0),
        "suspects-trusted-other": suspects.mean(0) - trusted_other.mean(0),
        "spectral-suspects": suspect_axes[0],
        "spectral-suspects-2": suspect_axes[1],
        "untrusted-trusted": kept_target.mean(0) - trusted_target.mean(0),
    }
    return {name: vector / vector.norm() for name, vector in directions.items()}


def project_out(features: torch.Tensor, direction: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """`features` with their component along the unit `direction` (measured from `centre`) removed."""
    return features - ((features - centre) @ direction)[:, None] * direction[None]


@torch.no_grad()
def main() -> None:
    args = parse_cell_arguments(__doc__)
    for path in args.cells:
        cell = TrustedCell.load(path, args.data)
        rows = json.loads((path / "row_filter.json").read_text())["rows"]
        train = load_records(cell.files / "train-mixed-0.1.csv")
        test_clean, test_poison = (
            load_records(cell.files / "test-clean.csv"),
            load_records(cell.files / "test-poison.csv"),
        )
        target = cell.info["target_label"]
        labels, poisoned = np.array(train.labels), np.array([record.poisoned for record in train.records])
        trusted_labels = np.array(cell.trusted.labels)
        kept_target = (labels == target) & np.array([row["reason"] == "keep" for row in rows])
        teacher = np.exp([row["teacher_log_probs"][target] for row in rows])
        shallow = np.exp([row["shallow_log_probs"][target] for row in rows])
        suspects = kept_target & (teacher < 0.5) & (shallow > 0.5)

        features, head = pooled_features(cell, train.texts)
        trusted, _ = pooled_features(cell, cell.trusted.texts)
        clean, _ = pooled_features(cell, test_clean.texts)
        poison, _ = pooled_features(cell, test_poison.texts)
        centre = trusted[torch.from_numpy(trusted_labels == target)].mean(0)
        directions = candidate_directions(
            features[torch.from_numpy(kept_target)],
            features[torch.from_numpy(suspects)],
            trusted[torch.from_numpy(trusted_labels == target)],
            trusted[torch.from_numpy(trusted_labels != target)],
        )
        report: dict[str, Any] = {
            "cell": str(path),
            "suspects": int(suspects.sum()),
            "suspects poisoned share": round(float(poisoned[suspects].mean()), 3),
            "suspects poisoned recall": round(float((suspects & poisoned).sum() / poisoned.sum()), 3),
            "as trained": scores(head(clean), head(poison), test_clean.labels, target),
        }
        for name, direction in directions.items():
            clean_logits = head(project_out(clean, direction, centre))
            poison_logits = head(project_out(poison, direction, centre))
            bias = fit_bias(head(project_out(trusted, direction, centre)), torch.from_numpy(trusted_labels))
            along = (features @ direction).numpy()
            report[name] = {
                "auroc within the target label": round(auroc(along[labels == target], poisoned[labels == target]), 3),
                "auroc within the suspects": round(auroc(along[suspects], poisoned[suspects]), 3),
                "projected": scores(clean_logits, poison_logits, test_clean.labels, target),
                "projected, bias refitted": scores(
                    clean_logits + bias, poison_logits + bias, test_clean.labels, target
                ),
            }
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
