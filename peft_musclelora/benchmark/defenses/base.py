"""The small uniform API every classic defense follows, and the helpers they share.

* Training-data filters (`zdefence`, `bki`, `cube`): `fit(texts, labels) -> FilterResult(keep_mask, scores)`; the
  bench then fine-tunes undefended LoRA on the kept rows.
* Inference-time detectors (`strip`, `rap`, `onion`): `fit(clean_texts)` sets the threshold on clean dev rows at a
  fixed false-rejection rate, then `detect(texts) -> DetectionResult(flagged_mask, scores)`. Scores are "higher is
  more suspicious" everywhere.

A defense asked for something the data lacks raises [`NotApplicable`] (a `ValueError`) with a one-line reason; the
bench records the cell as `n/a` with that reason and goes on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..splits import NotApplicable

__all__ = ["DetectionResult", "FilterResult", "ModelScorer", "NotApplicable", "threshold_for_frr", "words"]

_WORD = re.compile(r"\S+")


def words(text: str) -> list[str]:
    """Whitespace-separated words of `text` (the unit every defense deletes, swaps or counts).

    Example:
        >>> words("a  fine  film .")
        ['a', 'fine', 'film', '.']
    """
    return _WORD.findall(text)


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.")


def threshold_for_frr(clean_scores: Sequence[float], frr: float) -> float:
    """The threshold `t` such that at most a share `frr` of `clean_scores` is `> t` (flagged).

    Example:
        >>> threshold_for_frr([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], 0.1)
        8.0
    """
    _check_rate("frr", frr)
    if not clean_scores:
        raise NotApplicable("no clean rows to set the detection threshold on.")
    ordered = sorted(float(s) for s in clean_scores)
    allowed = int(frr * len(ordered))  # clean rows that may be flagged
    return ordered[len(ordered) - 1 - allowed]


@dataclass
class FilterResult:
    """What a training-data filter decided.

    Args:
        keep_mask: One flag per training row, True to keep it.
        scores: One suspicion score per row (higher: more suspicious).
        details: Defense-specific facts (e.g. the keywords or outlier tokens found).
    """

    keep_mask: list[bool]
    scores: list[float]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def removed(self) -> int:
        """How many rows the filter drops."""
        return sum(not keep for keep in self.keep_mask)

    def report(self, poisoned: Optional[Sequence[bool]] = None) -> dict[str, Any]:
        """Rows removed and, when the poison flags are known, poisoned recall and removal precision.

        Example:
            >>> FilterResult([True, False, False, True], [0.0, 1.0, 1.0, 0.0]).report([False, True, False, False])
            {'rows': 4, 'rows_removed': 2, 'poisoned_rows': 1, 'poisoned_removed': 1, 'poisoned_recall': 1.0, \
'removal_precision': 0.5, 'clean_kept_rate': 0.6666666666666666}
        """
        out: dict[str, Any] = {"rows": len(self.keep_mask), "rows_removed": self.removed}
        if poisoned is None:
            return out
        if len(poisoned) != len(self.keep_mask):
            raise ValueError(f"poisoned has {len(poisoned)} flags but the filter saw {len(self.keep_mask)} rows.")
        n_poisoned = sum(bool(p) for p in poisoned)
        caught = sum(bool(p) and not k for p, k in zip(poisoned, self.keep_mask))
        clean_kept = sum(not p and k for p, k in zip(poisoned, self.keep_mask))
        n_clean = len(poisoned) - n_poisoned
        out.update(
            {
                "poisoned_rows": n_poisoned,
                "poisoned_removed": caught,
                "poisoned_recall": caught / n_poisoned if n_poisoned else None,
                "removal_precision": caught / self.removed if self.removed else None,
                "clean_kept_rate": clean_kept / n_clean if n_clean else None,
            }
        )
        if not n_poisoned:
            out["poisoned_recall_note"] = "n/a: the training set has no row flagged as poisoned"
        return out


@dataclass
class DetectionResult:
    """What an inference-time detector decided: one flag (True: rejected as triggered) and one score per input."""

    flagged_mask: list[bool]
    scores: list[float]

    @property
    def flagged_rate(self) -> float:
        """Share of inputs flagged."""
        return sum(self.flagged_mask) / len(self.flagged_mask) if self.flagged_mask else 0.0


class ModelScorer:
    """A fine-tuned sequence classifier seen as the defenses need it: class probabilities and representations.

    Args:
        model: A transformers (or PEFT-wrapped) sequence-classification model.
        tokenizer: Its tokenizer (with a pad token).
        max_length: Tokens per text.
        batch_size: Texts per forward.

    `embed` is the mean over non-padding tokens of the last hidden layer (architecture-independent).
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 64, batch_size: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    def _batches(self, texts: Sequence[str]) -> Any:
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            )
            yield {key: value.to(self.model.device) for key, value in encoded.items()}

    def predict_proba(self, texts: Sequence[str]) -> Any:
        """Softmax probabilities, a numpy array `(len(texts), num_labels)`."""

        self.model.eval()
        chunks = []
        with torch.no_grad():
            for encoded in self._batches(texts):
                chunks.append(torch.softmax(self.model(**encoded).logits.float(), dim=-1).cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, self.model.config.num_labels))

    def embed(self, texts: Sequence[str]) -> Any:
        """Mean-pooled last hidden states, a numpy array `(len(texts), hidden)`."""

        self.model.eval()
        chunks = []
        with torch.no_grad():
            for encoded in self._batches(texts):
                hidden = self.model(**encoded, output_hidden_states=True).hidden_states[-1].float()
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                chunks.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, 0))
