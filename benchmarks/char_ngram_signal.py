"""Do character n-grams see the paraphrase triggers better than word n-grams? (session 20; flags for the AUROC only)

An archaic style (StyleBkd) shows in word endings ("-eth", "thee") as much as in whole words, which hashed token
n-grams split or miss. The text each probe reads is MiniLM-L6's own tokenisation joined back into words (lower-case,
punctuation split, the first 62 word pieces), so no probe sees the raw text's case or spacing, which differ between
the generator's rows and the treebank's (`raw_text_artifacts.py`). For each attack and each feature set (sublinear
tf-idf word 1-3-grams, character 2-5-grams within words, both) and each regularisation strength C in `--c`, a
logistic regression is fitted out of fold (two stratified folds) and prints the AUROC of the row's probability of
its label for poisoned against clean rows, the AUROC of p(target) within the target label, and the clean rows' mean
p(label) (how much of the clean task the probe explains).

    OMP_NUM_THREADS=1 python benchmarks/char_ngram_signal.py --attacks stylebkd,synbkd --c 0.03,0.125,1,4
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from scipy.sparse import hstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parent))
from row_filter_report import auroc  # noqa: E402

from peft_musclelora.benchmark.builders import default_model_dir  # noqa: E402
from peft_musclelora.benchmark.data import load_records  # noqa: E402

FEATURES = {
    "word 1-3": {"ngram_range": (1, 3)},
    "char 2-5": {"analyzer": "char_wb", "ngram_range": (2, 5)},
}


def out_of_fold_target_probability(features, labels: np.ndarray, c: float, seed: int = 0) -> np.ndarray:
    """Each row's p(label 1) from a logistic regression fitted on the other fold."""
    probability = np.zeros(len(labels))
    for fit, held in StratifiedKFold(2, shuffle=True, random_state=seed).split(features, labels):
        model = LogisticRegression(C=c, max_iter=3000).fit(features[fit], labels[fit])
        probability[held] = model.predict_proba(features[held])[:, 1]
    return probability


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default="stylebkd,synbkd")
    parser.add_argument("--data", default=os.environ.get("MUSCLELORA_DATA", "../shared/data"))
    parser.add_argument("--c", default="0.03,0.125,1,4", help="comma-separated inverse regularisation strengths")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)  # the benchmark's model
    print("| attack | features | C | AUROC, p(label) | AUROC within the target label | clean rows' p(label) |")
    print("|---|---|---|---|---|---|")
    for attack in args.attacks.split(","):
        train = load_records(Path(args.data) / "sst-2" / "poison" / attack / "train-mixed-0.1.csv")
        texts = [tokenizer.convert_tokens_to_string(tokenizer.tokenize(text)[:62]) for text in train.texts]
        labels, poisoned = np.array(train.labels), np.array([record.poisoned for record in train.records])
        target = labels == 1  # the shared sets' target label
        matrices = {
            name: TfidfVectorizer(min_df=2, sublinear_tf=True, **options).fit_transform(texts)
            for name, options in FEATURES.items()
        }
        matrices["both"] = hstack(list(matrices.values())).tocsr()
        for name, features in matrices.items():
            for c in (float(value) for value in args.c.split(",")):
                p_target = out_of_fold_target_probability(features, labels, c)
                p_label = np.where(target, p_target, 1.0 - p_target)
                print(
                    f"| {attack} | {name} | {c:g} | {auroc(p_label, poisoned):.3f} "
                    f"| {auroc(p_target[target], poisoned[target]):.3f} | {p_label[~poisoned].mean():.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
