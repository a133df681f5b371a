"""Does an n-gram model that tells the untrusted training rows from the trusted rows see a paraphrase trigger?
(session 12's analysis; the poison flags are read for the AUROC only).

Every poisoned row has the target label, and a trigger's n-grams (a style's words, a syntax template's openings)
occur in the untrusted rows of that label and not in the trusted clean rows. Per label, a logistic regression over
the rows' hashed 1-3-gram tf-idf (`peft_musclelora.shallow_probe`, MiniLM's token ids) separates the untrusted rows
from the trusted rows of the same label, scored out of fold (each untrusted row by a model that did not see it);
the score is the row's log-odds of being untrusted. Prints, per attack, the AUROC of that score for the poisoned
against the clean rows within the target label, and what a cut at the trusted rows' own 98th percentile (scored out
of fold the same way) would flag.

    OMP_NUM_THREADS=1 python benchmarks/origin_contrast_signal.py --attacks stylebkd,synbkd --seed 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from row_filter_report import auroc  # noqa: E402

from peft_musclelora.benchmark.builders import default_model_dir, load_tokenizer  # noqa: E402
from peft_musclelora.benchmark.data import load_records  # noqa: E402
from peft_musclelora.benchmark.splits import split_trusted  # noqa: E402
from peft_musclelora.row_filter import fold_assignment  # noqa: E402
from peft_musclelora.shallow_probe import (  # noqa: E402
    INVERSE_REGULARISATION,
    NgramFeatures,
    fit_logistic,
    logistic_log_probs,
)


def origin_scores(
    untrusted: list[list[int]], trusted: list[list[int]], folds: int, seed: int, inverse_regularisation: float
) -> tuple:
    """Out-of-fold log-odds of 'untrusted' for every untrusted and every trusted row."""
    rows = untrusted + trusted
    origin = torch.tensor([1] * len(untrusted) + [0] * len(trusted))
    features = NgramFeatures(rows).transform(rows)
    fold_of = torch.tensor(fold_assignment(len(rows), folds, seed))
    scores = torch.zeros(len(rows), dtype=torch.float64)
    for fold in range(folds):
        held_out, fit_rows = (fold_of == fold).nonzero().flatten(), (fold_of != fold).nonzero().flatten()
        weight, bias = fit_logistic(features.index_select(0, fit_rows), origin[fit_rows], 2, inverse_regularisation)
        log_probs = logistic_log_probs(features.index_select(0, held_out), weight, bias)
        scores[held_out] = log_probs[:, 1] - log_probs[:, 0]
    return scores[: len(untrusted)].numpy(), scores[len(untrusted) :].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default="badnets,addsent,stylebkd,synbkd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument(
        "--inverse-regularisation", type=float, default=INVERSE_REGULARISATION,
        help="C of the logistic regression (the library's shallow probe uses %(default)s)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(default_model_dir())

    def ids(texts: list[str]) -> list[list[int]]:
        return [row[1:-1] for row in tokenizer(texts, truncation=True, max_length=64)["input_ids"]]

    for attack in args.attacks.split(","):
        files = args.data / "sst-2" / "poison" / attack
        train = load_records(files / "train-mixed-0.1.csv")
        trusted, _ = split_trusted(load_records(files / "dev-clean.csv"), 400, args.seed)
        labels, poisoned = np.array(train.labels), np.array([r.poisoned for r in train.records])
        in_target = labels == 1
        untrusted_ids = ids([t for t, keep in zip(train.texts, in_target) if keep])
        trusted_ids = ids([t for t, label in zip(trusted.texts, trusted.labels) if label == 1])
        train_score, trusted_score = origin_scores(
            untrusted_ids, trusted_ids, args.folds, args.seed, args.inverse_regularisation
        )
        cut = np.quantile(trusted_score, 0.98)
        flagged = train_score > cut
        target_poisoned = poisoned[in_target]
        print(
            json.dumps(
                {
                    "attack": attack,
                    "C": args.inverse_regularisation,
                    "target-label rows (untrusted, trusted)": [len(untrusted_ids), len(trusted_ids)],
                    "auroc within the target label": round(auroc(train_score, target_poisoned), 3),
                    "trusted 98th-percentile cut: clean share, poisoned recall": [
                        round(float(flagged[~target_poisoned].mean()), 3),
                        round(float(flagged[target_poisoned].mean()), 3),
                    ],
                }
            )
        )


if __name__ == "__main__":
    main()
