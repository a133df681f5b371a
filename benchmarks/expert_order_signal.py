"""Research probe for issue 20: which n-gram orders the shallow expert should see.

Under the product of experts the adapter learns what the shallow expert does not explain, so an expert that also
explains the clean task takes that share of the task from the adapter (the clean-accuracy cost of the defense on the
paraphrase attacks). Single words carry most of SST-2's sentiment; a style or a syntactic template spans several
tokens. For each attack and each range of n-gram orders in `--orders` this fits the expert's model (hashed,
sublinear tf-idf n-grams, logistic regression at the row filter's C) and prints:

* fitted on the whole poisoned training set and scored on the test files: its clean accuracy (how much of the clean
  task it explains) and its ASR (how much of the backdoor it explains);
* out of fold on the training rows (the row filter's two seeded folds, as the expert is made): the mean probability
  of the row's label on the clean and on the poisoned rows (the expert's pull on each under the product of experts).
  The flags are read for this report only.

    OMP_NUM_THREADS=1 python benchmarks/expert_order_signal.py --attacks stylebkd,synbkd --orders 1-3,2-3,1-1
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import peft_musclelora.shallow_probe as shallow_probe
from peft_musclelora.benchmark.builders import default_model_dir
from peft_musclelora.benchmark.data import load_records
from peft_musclelora.row_filter import fold_assignment


def _orders(text: str) -> list[tuple[int, int]]:
    ranges = []
    for item in text.split(","):
        low, _, high = item.partition("-")
        ranges.append((int(low), int(high or low)))
    return ranges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default="badnets,addsent,stylebkd,synbkd")
    parser.add_argument("--data", default=os.environ.get("MUSCLELORA_DATA", "../shared/data"))
    parser.add_argument("--orders", default="1-3,2-3,1-1", help="comma-separated n-gram order ranges, e.g. 1-3,2-3")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)  # the benchmark's model

    def tokenize(records):
        return tokenizer([r.text for r in records], truncation=True, max_length=64)["input_ids"]

    print("| attack | n-gram orders | test CACC | test ASR | p(label), clean rows | p(label), poisoned rows |")
    print("|---|---|---|---|---|---|")
    for attack in args.attacks.split(","):
        folder = Path(args.data) / "sst-2" / "poison" / attack
        train = load_records(folder / "train-mixed-0.1.csv").records
        test_clean = load_records(folder / "test-clean.csv").records
        test_poison = load_records(folder / "test-poison.csv").records
        rows, test_rows, poison_rows = tokenize(train), tokenize(test_clean), tokenize(test_poison)
        labels = torch.tensor([r.label for r in train])
        poisoned = torch.tensor([bool(r.poisoned) for r in train])
        folds = torch.tensor(fold_assignment(len(train), 2, seed=0))
        target = int(labels[poisoned].mode().values) if bool(poisoned.any()) else 1
        for low, high in _orders(args.orders):
            features = shallow_probe.NgramFeatures(rows, order=high, min_order=low)
            x = features.transform(rows)
            weight, bias = shallow_probe.fit_logistic(x, labels, 2)
            cacc = (features.transform(test_rows) @ weight + bias).argmax(1)
            cacc = float((cacc == torch.tensor([r.label for r in test_clean])).double().mean())
            asr = float(((features.transform(poison_rows) @ weight + bias).argmax(1) == target).double().mean())
            own = torch.zeros(len(train), dtype=torch.float64)
            for fold in range(2):
                held, fit = (folds == fold).nonzero().flatten(), (folds != fold).nonzero().flatten()
                w, b = shallow_probe.fit_logistic(x.index_select(0, fit), labels[fit], 2)
                log_probs = shallow_probe.logistic_log_probs(x.index_select(0, held), w, b)
                own[held] = log_probs.gather(1, labels[held, None])[:, 0].exp()
            print(
                f"| {attack} | {low}-{high} | {100 * cacc:.1f} | {100 * asr:.1f} | {float(own[~poisoned].mean()):.3f} "
                f"| {float(own[poisoned].mean()):.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
