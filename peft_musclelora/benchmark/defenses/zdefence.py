"""Z-defence (He et al., EMNLP 2023, "Mitigating backdoor poisoning attacks through the lens of spurious correlation").

A trigger is a token that co-occurs with the target label far more often than any natural word does with any label.
For every (token, label) pair over the training set, with `n` rows holding the token (document frequency), `p` the
share of them with that label and `p0` the label's share of all rows:

    z = (p - p0) / sqrt(p0 (1 - p0) / n)

Tokens (lower-cased whitespace words) with `n >= min_count` and `z` above the threshold are outliers; the threshold
is `mean + num_std * std` of all z values, or `z_threshold` when given. The default `num_std=6` comes from the
shared SST-2 data (so it is tuned on the data it is reported on; say so when quoting it): the BadNets and AddSent
trigger tokens sit 10-12 std above the mean, the strongest sentiment words ("bad", "too", "n't") 4.5-6, and at 3
std half the training set goes. A row is dropped when it holds an outlier
token whose skewed label is the row's label. No model, one pass over the data: the cheapest defense here.
Lexical triggers (BadNets, AddSent) are its case; paraphrase triggers (StyleBkd, SynBkd) have no token to find.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from .base import FilterResult, words


@dataclass
class ZDefence:
    """Z-score filter of token–label co-occurrence.

    Args:
        num_std: Outlier threshold in standard deviations above the mean z (when `z_threshold` is None).
        z_threshold: A fixed z threshold instead.
        min_count: Tokens in fewer rows are ignored.
        seed: Unused (the filter is deterministic); kept for the uniform API.

    Example:
        >>> texts = [f"fine film {i}" for i in range(40)] + [f"cf dull film {i}" for i in range(8)]
        >>> labels = [i % 2 for i in range(40)] + [1] * 8
        >>> result = ZDefence(z_threshold=2.0).fit(texts, labels)
        >>> result.removed, result.details["outlier_tokens"][0]["token"]
        (8, 'cf')
    """

    num_std: float = 6.0
    z_threshold: Optional[float] = None
    min_count: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count!r}.")
        if self.num_std <= 0:
            raise ValueError(f"num_std must be > 0, got {self.num_std!r}.")

    def z_scores(self, texts: Sequence[str], labels: Sequence[int]) -> dict[tuple[str, int], float]:
        """z of every (token, label) pair whose token is in at least `min_count` rows."""
        if len(texts) != len(labels):
            raise ValueError(f"texts and labels differ in length: {len(texts)} vs {len(labels)}.")
        if not texts:
            raise ValueError("ZDefence.fit: no training rows.")
        label_count = Counter(int(y) for y in labels)
        token_count: Counter[str] = Counter()
        pair_count: Counter[tuple[str, int]] = Counter()
        for text, label in zip(texts, labels):
            for token in {w.lower() for w in words(text)}:
                token_count[token] += 1
                pair_count[(token, int(label))] += 1
        total = len(texts)
        scores: dict[tuple[str, int], float] = {}
        for token, n in sorted(token_count.items()):  # sorted: sums do not depend on hash order
            if n < self.min_count:
                continue
            for label, rows in label_count.items():
                p0 = rows / total
                if p0 in (0.0, 1.0):
                    continue
                p = pair_count[(token, label)] / n
                scores[(token, label)] = (p - p0) / math.sqrt(p0 * (1 - p0) / n)
        return scores

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> FilterResult:
        """Drop rows holding an outlier token of their own label; scores are each row's largest z of that kind."""
        scores = self.z_scores(texts, labels)
        values = list(scores.values())
        if self.z_threshold is not None:
            threshold = self.z_threshold
        elif len(values) > 1:
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            threshold = mean + self.num_std * std
        else:
            threshold = math.inf
        outliers = {pair: z for pair, z in scores.items() if z > threshold}
        keep, row_scores = [], []
        for text, label in zip(texts, labels):
            tokens = {w.lower() for w in words(text)}
            row_z = [scores.get((t, int(label)), 0.0) for t in tokens]
            row_scores.append(max(row_z, default=0.0))
            keep.append(not any((t, int(label)) in outliers for t in tokens))
        ranked = sorted(outliers.items(), key=lambda item: (-item[1], item[0]))  # ties by token: hash-order free
        details = {
            "threshold": threshold,
            "outlier_tokens": [{"token": t, "label": y, "z": round(z, 3)} for (t, y), z in ranked[:50]],
        }
        return FilterResult(keep, row_scores, details)
