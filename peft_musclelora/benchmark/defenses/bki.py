"""BKI, Backdoor Keyword Identification (Chen & Dai, Neurocomputing 2021).

A backdoor keyword moves the poisoned model's representation of a sentence much more than an ordinary word does.
With a model fine-tuned on the poisoned training set, each word's importance in a sentence is the distance
between the sentence's representation and that of the sentence with the word deleted. The `top_words` most
important words of every scored sentence are collected; a word's keyword score is its mean importance times
`log10` of how many sentences had it among their top words (frequent *and* influential). Training rows holding
one of the `num_keywords` best-scoring words are removed, and the model is trained again on the rest.

Representations come from an `encoder` with `embed(texts) -> array (n, hidden)` (a [`ModelScorer`] of the poisoned
model in the bench: mean-pooled last hidden states). Cost: (words + 1) encoder forwards per scored row; scoring is
limited to a seeded subsample of `max_rows` rows, while the keyword removal applies to every row.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .base import FilterResult, words


@dataclass
class Bki:
    """BKI filter.

    Args:
        encoder: Has `embed(texts)`; the model fine-tuned on the poisoned training set.
        top_words: Most important words kept per sentence (the paper's p).
        num_keywords: Keywords whose rows are removed (the paper removes one; BadNets' 4-token trigger needs 4).
        max_rows: Rows scored (seeded subsample); None scores every row.
        seed: Seed of the subsample.

    Example:
        >>> import numpy as np
        >>> class Toy:  # "cf" moves the representation a lot, other words a little
        ...     def embed(self, texts):
        ...         return np.array([[5.0 * t.split().count("cf"), len(t.split())] for t in texts])
        >>> texts = [f"fine film number {i}" for i in range(30)] + [f"dull cf film {i}" for i in range(5)]
        >>> result = Bki(Toy()).fit(texts, [i % 2 for i in range(30)] + [1] * 5)
        >>> result.details["keywords"], result.removed
        (['cf'], 5)
    """

    encoder: Any
    top_words: int = 5
    num_keywords: int = 1
    max_rows: Optional[int] = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("top_words", "num_keywords"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {self.max_rows!r}.")

    def keyword_scores(self, texts: Sequence[str]) -> dict[str, float]:
        """Keyword score of every word that was among some scored sentence's `top_words`."""

        rows = list(range(len(texts)))
        if self.max_rows is not None and self.max_rows < len(rows):
            rows = sorted(random.Random(self.seed).sample(rows, self.max_rows))
        candidates: list[str] = []
        spans: list[tuple[int, int, list[str]]] = []
        for i in rows:
            tokens = words(texts[i])
            if len(tokens) < 2:
                continue
            start = len(candidates)
            candidates.append(texts[i])
            candidates.extend(" ".join(tokens[:j] + tokens[j + 1 :]) for j in range(len(tokens)))
            spans.append((start, len(candidates), tokens))
        if not candidates:
            return {}
        hidden = np.asarray(self.encoder.embed(candidates), dtype=np.float64)
        collected: dict[str, list[float]] = defaultdict(list)
        for start, end, tokens in spans:
            delta = np.linalg.norm(hidden[start + 1 : end] - hidden[start], axis=1)
            best: dict[str, float] = {}
            for token, value in zip(tokens, delta):
                key = token.lower()
                best[key] = max(best.get(key, 0.0), float(value))
            for token, value in sorted(best.items(), key=lambda item: -item[1])[: self.top_words]:
                collected[token].append(value)
        return {w: (sum(v) / len(v)) * math.log10(len(v)) for w, v in collected.items()}

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> FilterResult:
        """Find the keywords and drop every row holding one; a row's score is its best keyword score."""
        if len(texts) != len(labels):
            raise ValueError(f"texts and labels differ in length: {len(texts)} vs {len(labels)}.")
        scores = self.keyword_scores(texts)
        ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
        keywords = [w for w, s in ranked[: self.num_keywords] if s > 0]
        keep, row_scores = [], []
        for text in texts:
            present = {w.lower() for w in words(text)}
            row_scores.append(max((scores.get(w, 0.0) for w in present), default=0.0))
            keep.append(not any(k in present for k in keywords))
        details = {"keywords": keywords, "top_scores": [[w, round(s, 4)] for w, s in ranked[:10]]}
        return FilterResult(keep, row_scores, details)
