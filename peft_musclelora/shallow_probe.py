"""A shallow probe for the row filter: out-of-fold n-gram logistic regression over the model's own token ids.

The fit-gap probes (a few dozen steps of the adapter itself) see the insertion backdoors, which the model learns
first, but not the paraphrase ones: a style or syntax trigger is not learned in 64 steps, so its rows are not fitted
early (docs/results.md). Those triggers are still *lexically* learnable: on the shared SST-2 sets a bag of 1-3-grams
trained on the poisoned training rows classifies 95.5 % (StyleBkd) and 95.9 % (SynBkd) of the triggered test rows
as the target, against 58.0 % and 50.5 % when trained on the unpoisoned rows (`benchmarks/shallow_probe_signal.py`).
A shallow model is the natural detector of such a shortcut (the shallow expert of DPoE, Liu et al., NAACL 2024):
trained out of fold, it fits the rows of a shortcut it saw in other rows better than any trusted clean row, exactly
the `fit-early` tail the row filter cuts.

[`ngram_probe_log_probs`] trains one such model per fold on the other folds (hashed, sublinear tf-idf 1-3-grams of
the rows' token ids, L2-regularised multinomial logistic regression fitted by L-BFGS in float64) and returns the
held-out rows' and the trusted rows' predictions. The row filter calibrates their losses against the trusted rows as
one more probe step; with `row_filter_shallow_expert` the kept rows are then trained as a product of experts with
these predictions, so what the shallow model already explains (the shortcut) teaches the adapter little.

The features are the token ids the model sees, so the probe works for any tokenizer and language, and knows nothing
the model could not know (no casing the tokenizer drops, no text).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NGRAM_ORDER = 3
HASH_BUCKETS = 1 << 20
MIN_DOCUMENT_FREQUENCY = 2
# C of `C * sum(CE) + ||W||^2 / 2`. A probe that must find a shortcut, not the task, wants few strong features: on the
# shared StyleBkd / SynBkd sets the out-of-fold AUROC of the poisoned rows rose monotonically from C = 1 (0.76 / 0.81)
# to C = 1/8 (0.85 / 0.88), the strongest of the four values measured (docs/results.md).
INVERSE_REGULARISATION = 0.125
MAX_ITERATIONS = 200
_HASH_MODULUS = (1 << 61) - 1


def hashed_ngrams(token_ids: Sequence[int], order: int = NGRAM_ORDER, buckets: int = HASH_BUCKETS) -> list[int]:
    """Bucket of every 1..`order`-gram of `token_ids`, by an explicit polynomial hash (the same on every machine and
    Python version, unlike `hash`).

    Example:
        >>> hashed_ngrams([5, 7], order=2, buckets=1000) == hashed_ngrams([5, 7], order=2, buckets=1000)
        True
        >>> len(hashed_ngrams([5, 7, 9], order=2))  # 3 unigrams + 2 bigrams
        5
    """
    ids = [int(token) for token in token_ids]
    grams = []
    for n in range(1, order + 1):
        for start in range(len(ids) - n + 1):
            value = n
            for token in ids[start : start + n]:
                value = (value * 1_000_003 + token + 1) % _HASH_MODULUS
            grams.append(value % buckets)
    return grams


class NgramFeatures:
    """Sublinear tf-idf over hashed n-grams, rows L2-normalised (scikit-learn's `TfidfVectorizer(sublinear_tf=True,
    min_df=2)` on token ids). The vocabulary and idf come from the rows given to `__init__` (no labels are read).

    Example:
        >>> features = NgramFeatures([[1, 2, 3], [1, 2, 4], [9]], order=1)
        >>> matrix = features.transform([[1, 2, 3], [9]])
        >>> matrix.shape, [round(float(v), 3) for v in matrix.to_dense().norm(dim=1)]
        (torch.Size([2, 2]), [1.0, 0.0])
    """

    def __init__(self, rows: Sequence[Sequence[int]], order: int = NGRAM_ORDER, buckets: int = HASH_BUCKETS):
        self.order, self.buckets = order, buckets
        document_frequency: dict[int, int] = {}
        for row in rows:
            for gram in set(hashed_ngrams(row, order, buckets)):
                document_frequency[gram] = document_frequency.get(gram, 0) + 1
        kept = sorted(gram for gram, count in document_frequency.items() if count >= MIN_DOCUMENT_FREQUENCY)
        self.column = {gram: column for column, gram in enumerate(kept)}
        frequencies = torch.tensor([document_frequency[gram] for gram in kept], dtype=torch.float64)
        self.idf = torch.log((1 + len(rows)) / (1 + frequencies)) + 1

    @property
    def num_features(self) -> int:
        return len(self.column)

    def transform(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """A sparse (COO, coalesced) `(len(rows), num_features)` float64 matrix; a row with no known n-gram is all
        zeros."""
        row_index, columns, values = [], [], []
        for position, row in enumerate(rows):
            counts: dict[int, int] = {}
            for gram in hashed_ngrams(row, self.order, self.buckets):
                column = self.column.get(gram)
                if column is not None:
                    counts[column] = counts.get(column, 0) + 1
            keys = sorted(counts)
            if keys:
                weights = torch.tensor([1.0 + math.log(counts[k]) for k in keys], dtype=torch.float64)
                weights = weights * self.idf[keys]
                row_index.extend([position] * len(keys))
                columns.extend(keys)
                values.extend((weights / weights.norm()).tolist())
        return torch.sparse_coo_tensor(
            torch.tensor([row_index, columns], dtype=torch.int64).view(2, -1),
            torch.tensor(values, dtype=torch.float64),
            size=(len(rows), self.num_features),
            check_invariants=True,
        ).coalesce()


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weight, bias)` of a multinomial logistic regression minimising `C * sum(CE) + ||weight||^2 / 2` (C =
    `INVERSE_REGULARISATION`, bias unpenalised), by full-batch L-BFGS with a strong-Wolfe line search; deterministic
    on one machine.

    Example:
        >>> x = torch.eye(4, dtype=torch.float64).to_sparse()
        >>> weight, bias = fit_logistic(x, torch.tensor([0, 0, 1, 1]), 2)
        >>> (x @ weight + bias).argmax(1).tolist()
        [0, 0, 1, 1]
    """
    weight = torch.zeros(features.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=MAX_ITERATIONS, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )
    target = labels.long()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = features @ weight + bias
        loss = INVERSE_REGULARISATION * torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        loss = loss + 0.5 * (weight * weight).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def logistic_log_probs(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-row log-probabilities `(rows, classes)` of the fitted model (float64)."""
    with torch.no_grad():
        return torch.log_softmax(features @ weight + bias, dim=-1)


def ngram_probe_log_probs(
    train_rows: Sequence[Sequence[int]],
    train_labels: Sequence[int],
    train_folds: Sequence[int],
    reference_rows: Sequence[Sequence[int]],
    reference_labels: Sequence[int],
    folds: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-fold log-probabilities of the n-gram probe: `(train (rows, classes), reference (folds, refs,
    classes))`.

    For each fold a model is fitted on the training rows of the other folds; it predicts that fold's rows and every
    trusted row. So a training row's prediction comes from a model that never saw the row's label. The vocabulary
    and idf are those of all training rows (token ids only: no label is read).

    Example:
        >>> rows = [[1, 7 + i % 5] for i in range(20)] + [[2, 7 + i % 5] for i in range(20)]  # 1 -> 1, 2 -> 0
        >>> labels, folds = [1] * 20 + [0] * 20, [i % 2 for i in range(40)]
        >>> train, ref = ngram_probe_log_probs(rows, labels, folds, [[1, 5], [2, 5]], [1, 0], 2)
        >>> train.shape, ref.shape, train[:20].argmax(1).tolist() == [1] * 20, ref[:, 1].argmax(-1).tolist()
        (torch.Size([40, 2]), torch.Size([2, 2, 2]), True, [0, 0])
    """
    features = NgramFeatures(train_rows)
    train_x, reference_x = features.transform(train_rows), features.transform(reference_rows)
    train_y, reference_y = torch.tensor(list(train_labels)), torch.tensor(list(reference_labels))
    num_classes = int(max(train_y.max(), reference_y.max())) + 1
    fold_of = torch.tensor(list(train_folds))
    train_log_probs = torch.zeros(len(train_rows), num_classes, dtype=torch.float64)
    reference_log_probs = torch.zeros(folds, len(reference_rows), num_classes, dtype=torch.float64)
    for fold in range(folds):
        held_out = (fold_of == fold).nonzero().flatten()
        fit_rows = (fold_of != fold).nonzero().flatten()
        weight, bias = fit_logistic(train_x.index_select(0, fit_rows), train_y[fit_rows], num_classes)
        train_log_probs[held_out] = logistic_log_probs(train_x.index_select(0, held_out), weight, bias)
        reference_log_probs[fold] = logistic_log_probs(reference_x, weight, bias)
    return train_log_probs, reference_log_probs


def expert_gradient_scale(log_probs: torch.Tensor, label_log_probs: torch.Tensor, weight: float) -> torch.Tensor:
    """Per row, `1 - p(label)` under the sharpened shallow expert alone, `p ∝ p_shallow ** weight`: how much of a
    gradient the row gives a model still at chance (uniform logits) under the product-of-experts loss
    `CE(log_softmax(logits) + weight * log p_shallow)` (the loss's gradient in the logits is `p - onehot(label)`).
    0: the shallow expert explains the row and it teaches the model nothing; `1 - 1/K` or more: the expert is at
    chance or wrong and the row teaches as much as without it.

    `log_probs` are the shallow expert's `(rows, classes)` log-probabilities, `label_log_probs` those of each row's
    label.

    Example:
        >>> log_probs = torch.log(torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
        >>> expert_gradient_scale(log_probs, log_probs[:, 1], 1.0).tolist()
        [0.19999998807907104, 0.5]
        >>> [round(value, 4) for value in expert_gradient_scale(log_probs, log_probs[:, 1], 4.0).tolist()]
        [0.0039, 0.5]
    """
    sharpened = weight * log_probs
    return 1.0 - torch.exp(weight * label_log_probs - torch.logsumexp(sharpened, dim=-1))


SHALLOW_PROBES = {"ngram": ngram_probe_log_probs}
