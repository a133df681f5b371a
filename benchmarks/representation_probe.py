"""Research probe for issue 20: do a trained cell's features separate the poisoned training rows from the trusted ones?

The fit-gap probes see the paraphrase backdoors (StyleBkd, SynBkd) near chance: these triggers are not learned in
the first 64 steps. A finished cell *has* learned them, so its classifier input (the pooled features) may place the
poisoned rows apart from the trusted clean rows of the same label. For the training rows of a finished cell and
the trusted rows of its seed, this computes, with and without the adapter (pretrained features):

- `density`: an out-of-fold logistic regression separating training rows from trusted rows (5 folds over both
  sets); a row's score is its probability of being a training row;
- `knn`: the mean cosine distance to the 10 nearest trusted rows of the row's own label.

It prints the AUROC of each score for poisoned vs clean training rows, over all rows and within the target label.
The poison flags are read for this report only.

    OMP_NUM_THREADS=1 python benchmarks/representation_probe.py runs/full-size-fitgap/cells/stylebkd/fit-gap/seed0 \
        --attack stylebkd
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from peft_musclelora.benchmark.builders import load_cell
from peft_musclelora.benchmark.data import SharedData, load_records
from peft_musclelora.benchmark.splits import split_trusted


@torch.no_grad()
def _features(model, tokenizer, texts: list[str]) -> np.ndarray:
    captured: list[torch.Tensor] = []
    head = model.base_model.model.classifier
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    try:
        for start in range(0, len(texts), 64):
            encoded = tokenizer(
                texts[start : start + 64], truncation=True, max_length=64, padding=True, return_tensors="pt"
            )
            model(**encoded)
    finally:
        hook.remove()
    return torch.cat(captured).float().numpy()


def _density(train: np.ndarray, trusted: np.ndarray, seed: int) -> np.ndarray:
    x = np.concatenate([train, trusted])
    y = np.concatenate([np.ones(len(train)), np.zeros(len(trusted))])
    scores = np.zeros(len(x))
    for fit_idx, score_idx in StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y):
        scaler = StandardScaler().fit(x[fit_idx])
        classifier = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")
        classifier.fit(scaler.transform(x[fit_idx]), y[fit_idx])
        scores[score_idx] = classifier.predict_proba(scaler.transform(x[score_idx]))[:, 1]
    return scores[: len(train)]


def _knn(train: np.ndarray, train_labels, trusted: np.ndarray, trusted_labels, k: int = 10) -> np.ndarray:
    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)

    train, trusted = unit(train), unit(trusted)
    train_labels, trusted_labels = np.asarray(train_labels), np.asarray(trusted_labels)
    scores = np.zeros(len(train))
    for label in np.unique(train_labels):
        rows, refs = train_labels == label, trusted[trusted_labels == label]
        distance = 1.0 - train[rows] @ refs.T
        scores[rows] = np.sort(distance, axis=1)[:, :k].mean(1)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell")
    parser.add_argument("--attack", required=True)
    parser.add_argument("--trusted", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    files = SharedData.resolve().attack_files(args.attack)
    train = load_records(files.train)
    trusted, _ = split_trusted(load_records(files.dev), args.trusted, args.seed)
    model, tokenizer, info = load_cell(Path(args.cell) / "adapter")
    poisoned = np.array([record.poisoned for record in train.records])
    target = np.array(train.labels) == info["target_label"]
    report = {"attack": args.attack, "cell": args.cell}
    for name in ("trained", "pretrained"):
        if name == "trained":
            train_x, trusted_x = _features(model, tokenizer, train.texts), _features(model, tokenizer, trusted.texts)
        else:
            with model.disable_adapter():
                train_x = _features(model, tokenizer, train.texts)
                trusted_x = _features(model, tokenizer, trusted.texts)
        scores = {
            "density": _density(train_x, trusted_x, args.seed),
            "knn": _knn(train_x, train.labels, trusted_x, trusted.labels),
        }
        for score_name, score in scores.items():
            report[f"{name}_{score_name}_auroc"] = round(float(roc_auc_score(poisoned, score)), 3)
            report[f"{name}_{score_name}_auroc_target"] = round(
                float(roc_auc_score(poisoned[target], score[target])), 3
            )
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
