"""What a residual expert would leave each row to teach (session 15's analysis; poison flags read here only).

For finished cells made with the trusted teacher (`row_filter_teacher_mix` or `row_filter_residual_expert`: their
`row_filter.json` holds each training row's `teacher_log_probs` and `shallow_log_probs`), fits, out of fold on the
cell's own folds, the candidate shallow experts of session 15 and prints, per expert and weight `w`, the gradient a
kept row would give a model at chance under the product of experts (`1 - p_comb(label)`, `p_comb` proportional to
`p_expert ** w`; [`~shallow_probe.expert_gradient_scale`]) for the clean rows of the target label and of the other,
for the poisoned rows the teacher contradicts (`p_teacher(target) < 0.5`: mostly the relabelled ones) and for the
others, the poisoned rows' share of the target label's gradient, and the share of clean and of contradicted
poisoned rows left under 0.1 of it. Then, as a detector, the AUROC of the expert's logit towards each row's label
for poisoned against clean rows of the target label, and the recall of poisoned rows at cuts that flag 2 % and 4 %
of the clean rows of that label. The experts:

- `ngram`: the cell's own shallow probe, as saved;
- `residual-ngram C`: the n-gram features fitted with the teacher's log-probabilities as offsets
  ([`~shallow_probe.residual_log_probs`], no bias);
- `residual-hidden C`: the same over the pretrained model's mean-pooled middle-layer hidden states, standardised;
- `residual-probe64 C`: the hidden residual with the fold probes' last-step prediction as the offsets instead of
  the teacher's (two classes only: the probes save `p(label)` alone).

    OMP_NUM_THREADS=1 python benchmarks/residual_expert_signal.py \
        runs-v3/s13-teacher-l4-m0.5-stylebkd-s0-refit/cells/stylebkd/fit-gap-unlearn/seed0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from peft_musclelora.benchmark.builders import default_model_dir, load_tokenizer
from peft_musclelora.benchmark.presets import get_preset
from peft_musclelora.row_filter import fold_assignment
from peft_musclelora.shallow_probe import NgramFeatures, residual_log_probs, standardised

sys.path.insert(0, str(Path(__file__).resolve().parent))
from row_filter_report import auroc, read_decisions  # noqa: E402


@torch.no_grad()
def middle_layer_means(texts: list[str], max_length: int) -> torch.Tensor:
    """The pretrained model's hidden states at its middle layer, averaged over each text's tokens."""
    from transformers import AutoModel

    tokenizer = load_tokenizer(default_model_dir())
    model = AutoModel.from_pretrained(str(default_model_dir())).eval()
    means = []
    for start in range(0, len(texts), 64):
        encoded = tokenizer(
            texts[start : start + 64], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        states = model(**encoded, output_hidden_states=True).hidden_states
        middle, mask = states[len(states) // 2], encoded["attention_mask"][..., None].float()
        means.append((middle * mask).sum(1) / mask.sum(1))
    return torch.cat(means)


def expert_report(
    log_probs: torch.Tensor, labels: np.ndarray, poisoned: np.ndarray, contradicted: np.ndarray, weights: list[float]
) -> dict:
    rows, target = np.arange(len(labels)), labels == 1
    groups = (~poisoned & target, ~poisoned & ~target, poisoned & contradicted, poisoned & ~contradicted)
    report: dict = {}
    for weight in weights:
        combined = torch.log_softmax(weight * log_probs, dim=-1)
        scale = (1 - combined[rows, labels].exp()).numpy()
        report[f"w{weight:g}"] = {
            "gradient: clean target-label, clean other, poisoned contradicted, poisoned other": [
                round(float(scale[mask].mean()), 3) for mask in groups
            ],
            "poisoned share of the target label's gradient": round(
                float(scale[poisoned].sum() / scale[target].sum()), 3
            ),
            "under 0.1: clean, poisoned contradicted": [
                round(float((scale[~poisoned] < 0.1).mean()), 3),
                round(float((scale[poisoned & contradicted] < 0.1).mean()), 3),
            ],
        }
    toward_label = (log_probs[rows, labels] - log_probs[rows, 1 - labels]).numpy()  # two classes
    clean_target = toward_label[~poisoned & target]
    report["detector: auroc (label 1), recall at 2 % / 4 % clean flagged"] = [
        round(auroc(toward_label[target], poisoned[target]), 3),
        *(round(float((toward_label[poisoned] > np.quantile(clean_target, 1 - q)).mean()), 3) for q in (0.02, 0.04)),
    ]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", type=Path, help="finished cells made with the trusted teacher")
    parser.add_argument("--ngram-c", type=float, nargs="*", default=[0.125, 4.0])
    parser.add_argument("--hidden-c", type=float, nargs="*", default=[0.001, 0.003, 0.01])
    parser.add_argument("--weights", type=float, nargs="*", default=[1.0, 2.0, 4.0, 6.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    max_length = get_preset("fit-gap-poe").training.max_length
    tokenizer = load_tokenizer(default_model_dir())
    for cell in args.cells:
        decisions, train, poisoned, labels = read_decisions(cell)
        metrics = json.loads((cell / "metrics.json").read_text())
        rows = decisions["rows"]
        folds = fold_assignment(len(rows), decisions["summary"]["folds"], metrics["seed"])
        teacher = torch.tensor([row["teacher_log_probs"] for row in rows], dtype=torch.float64)
        contradicted = teacher[:, 1].exp().numpy() < 0.5
        experts = {"ngram": torch.tensor([row["shallow_log_probs"] for row in rows], dtype=torch.float64)}
        ids = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in train.texts]
        ngrams = NgramFeatures(ids).transform(ids)
        for c in args.ngram_c:
            experts[f"residual-ngram C{c:g}"] = residual_log_probs(ngrams, labels.tolist(), folds, teacher, 2, c)
        hidden = standardised(middle_layer_means(train.texts, max_length))
        steps = len(decisions["summary"]["probe_steps"])
        p_label = torch.tensor([-row["losses"][steps - 1] for row in rows], dtype=torch.float64).exp()
        p_target = torch.where(torch.tensor(labels) == 1, p_label, 1 - p_label).clamp(1e-6, 1 - 1e-6)
        probe = torch.log(torch.stack([1 - p_target, p_target], dim=1))
        for c in args.hidden_c:
            experts[f"residual-hidden C{c:g}"] = residual_log_probs(hidden, labels.tolist(), folds, teacher, 2, c)
            experts[f"residual-probe64 C{c:g}"] = residual_log_probs(hidden, labels.tolist(), folds, probe, 2, c)
        report = {
            "cell": str(cell),
            "teacher accuracy on clean rows": round(float((teacher.argmax(1).numpy() == labels)[~poisoned].mean()), 3),
            "poisoned rows the teacher contradicts": int((poisoned & contradicted).sum()),
        }
        for name, log_probs in experts.items():
            report[name] = expert_report(log_probs, labels, poisoned, contradicted, args.weights)
        print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
