"""STRIP (Gao et al., IEEE TDSC 2021, text variant): a triggered input stays confidently on the target when perturbed.

Each input is copied `num_copies` times and in each copy every word is, with probability `swap_ratio`, replaced by
a word drawn from the clean dev texts. The suspicion score is minus the mean entropy of the model's predictions over
the copies: a trigger that survives the swaps keeps the prediction fixed (low entropy), a clean sentence whose
content words were swapped does not. The threshold is set on clean dev rows at a fixed false-rejection rate.
Cost: `num_copies` forwards per input on the undefended model, no training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .base import DetectionResult, NotApplicable, _check_rate, threshold_for_frr, words


@dataclass
class Strip:
    """STRIP detector on a classifier exposing `predict_proba(texts) -> array (n, labels)`.

    Args:
        classifier: e.g. a [`ModelScorer`] of the undefended model.
        num_copies: Perturbed copies per input.
        swap_ratio: Probability that a word is replaced in a copy.
        frr: False-rejection rate on the clean texts given to `fit` that sets the threshold.
        seed: Seed of the word swaps (same seed, same scores).

    Example:
        >>> import numpy as np
        >>> class Toy:  # confident on anything holding "cf", unsure otherwise
        ...     def predict_proba(self, texts):
        ...         return np.array([[0.01, 0.99] if "cf" in t.split() else [0.5, 0.5] for t in texts])
        >>> strip = Strip(Toy(), num_copies=4, swap_ratio=0.3).fit([f"plain text {i}" for i in range(20)])
        >>> strip.detect(["cf cf cf cf plain text", "plain text here"]).flagged_mask
        [True, False]
    """

    classifier: Any
    num_copies: int = 16
    swap_ratio: float = 0.5
    frr: float = 0.05
    seed: int = 0
    threshold: Optional[float] = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.num_copies < 1:
            raise ValueError(f"num_copies must be >= 1, got {self.num_copies!r}.")
        _check_rate("swap_ratio", self.swap_ratio)
        _check_rate("frr", self.frr)
        self._pool: list[str] = []

    def score(self, texts: Sequence[str]) -> list[float]:
        """Minus the mean prediction entropy over perturbed copies of each text (higher: more suspicious)."""

        if not self._pool:
            raise ValueError("Strip.score: call fit(clean_texts) first (it provides the replacement words).")
        rng = np.random.default_rng(self.seed)
        copies: list[str] = []
        for text in texts:
            tokens = words(text) or [text]
            for _ in range(self.num_copies):
                swap = rng.random(len(tokens)) < self.swap_ratio
                picks = rng.integers(0, len(self._pool), len(tokens))
                copies.append(" ".join(self._pool[p] if s else w for w, s, p in zip(tokens, swap, picks)))
        probs = np.asarray(self.classifier.predict_proba(copies), dtype=np.float64)
        entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
        return [-float(v) for v in entropy.reshape(len(texts), self.num_copies).mean(axis=1)]

    def fit(self, clean_texts: Sequence[str]) -> Strip:
        """Collect the replacement words and set the threshold at `frr` on `clean_texts`."""
        self._pool = [w for text in clean_texts for w in words(text)]
        if not self._pool:
            raise NotApplicable("STRIP needs clean dev texts to draw replacement words from; none were given.")
        self.threshold = threshold_for_frr(self.score(clean_texts), self.frr)
        return self

    def detect(self, texts: Sequence[str]) -> DetectionResult:
        """Flag texts whose score is above the threshold."""
        if self.threshold is None:
            raise ValueError("Strip.detect: call fit(clean_texts) first.")
        scores = self.score(texts)
        return DetectionResult([s > self.threshold for s in scores], scores)
