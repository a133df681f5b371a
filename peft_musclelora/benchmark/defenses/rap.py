"""RAP (Yang et al., EMNLP 2021, "RAP: robustness-aware perturbations for defending against backdoor attacks").

A rare word (`rap_word`, one token) is prepended to inputs and only its input embedding is trained, on clean dev
rows the model assigns to the target label, so that it lowers the target probability by between `lower` and
`upper`. Triggered inputs are robust to it (the backdoor keeps the target probability up): their drop is small.
Score = minus the drop; the threshold is set on the clean target rows at a fixed false-rejection rate; inputs not
predicted as the target are never flagged. Cost: `epochs` passes of forward + backward over the clean target rows
(one embedding row trains), then two forwards per input.

The embedding row of `rap_word` is changed in the model it is given (give it a copy you can spend).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .base import DetectionResult, ModelScorer, NotApplicable, _check_rate, threshold_for_frr


@dataclass
class Rap:
    """RAP detector on a sequence-classification `model` and its `tokenizer`.

    Args:
        model: The undefended model (its `rap_word` embedding row is trained in place).
        tokenizer: Its tokenizer; `rap_word` must be a single known token of it.
        target_label: The label the backdoor targets.
        rap_word: The perturbation word (rare, one token; "mb" as in the paper's code).
        lower: Wanted minimum drop of the target probability on clean target rows.
        upper: Wanted maximum drop.
        epochs: Passes over the clean target rows.
        lr: Step size, relative to the embedding row's norm (normalised-gradient steps).
        frr: False-rejection rate on the clean target rows that sets the threshold.
        max_length: Tokens per text.
        batch_size: Texts per step.
        seed: Seed of the row order.
    """

    model: Any
    tokenizer: Any
    target_label: int = 1
    rap_word: str = "mb"
    lower: float = 0.1
    upper: float = 0.3
    epochs: int = 5
    lr: float = 0.05
    frr: float = 0.05
    max_length: int = 64
    batch_size: int = 32
    seed: int = 0
    threshold: Optional[float] = field(default=None, init=False)

    def __post_init__(self) -> None:
        _check_rate("frr", self.frr)
        if not 0 <= self.lower < self.upper <= 1:
            raise ValueError(f"need 0 <= lower < upper <= 1, got lower={self.lower!r}, upper={self.upper!r}.")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs!r}.")
        ids = self.tokenizer(self.rap_word, add_special_tokens=False)["input_ids"]
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if len(ids) != 1 or ids[0] == unk:
            raise ValueError(f"rap_word {self.rap_word!r} must be one known token of the tokenizer, got ids {ids}.")
        self.token_id = ids[0]
        self._scorer = ModelScorer(self.model, self.tokenizer, self.max_length, self.batch_size)

    def _perturb(self, texts: Sequence[str]) -> list[str]:
        return [f"{self.rap_word} {text}" for text in texts]

    def drops(self, texts: Sequence[str]) -> tuple[list[float], list[int]]:
        """Drop of the target probability when `rap_word` is prepended, and the unperturbed predictions."""
        before = self._scorer.predict_proba(texts)
        after = self._scorer.predict_proba(self._perturb(texts))
        drop = before[:, self.target_label] - after[:, self.target_label]
        return [float(d) for d in drop], [int(p) for p in before.argmax(axis=1)]

    def _train_embedding(self, texts: list[str]) -> None:

        embedding = self.model.get_input_embeddings().weight
        was_trainable = embedding.requires_grad
        embedding.requires_grad_(True)
        base = self._scorer.predict_proba(texts)[:, self.target_label]
        generator = torch.Generator().manual_seed(self.seed)
        self.model.eval()
        try:
            for _ in range(self.epochs):
                order = torch.randperm(len(texts), generator=generator).tolist()
                for start in range(0, len(order), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    encoded = self.tokenizer(
                        self._perturb([texts[i] for i in idx]),
                        truncation=True,
                        max_length=self.max_length,
                        padding=True,
                        return_tensors="pt",
                    ).to(self.model.device)
                    prob = torch.softmax(self.model(**encoded).logits.float(), dim=-1)[:, self.target_label]
                    drop = torch.as_tensor(base[idx], dtype=prob.dtype) - prob
                    loss = (torch.relu(self.lower - drop) + torch.relu(drop - self.upper)).mean()
                    embedding.grad = None
                    loss.backward()
                    grad = embedding.grad[self.token_id]
                    norm = grad.norm()
                    if norm > 0:
                        with torch.no_grad():
                            row = embedding[self.token_id]
                            row -= self.lr * row.norm().clamp(min=1e-3) * grad / norm
        finally:
            embedding.grad = None
            embedding.requires_grad_(was_trainable)
            for param in self.model.parameters():
                param.grad = None

    def fit(self, clean_texts: Sequence[str]) -> Rap:
        """Train the `rap_word` embedding on the clean rows predicted as the target, then set the threshold."""
        preds = self._scorer.predict_proba(clean_texts).argmax(axis=1)
        target_rows = [t for t, p in zip(clean_texts, preds) if int(p) == self.target_label]
        if not target_rows:
            raise NotApplicable(f"RAP: no clean dev row is predicted as the target label {self.target_label}.")
        self._train_embedding(target_rows)
        drops, _ = self.drops(target_rows)
        self.threshold = threshold_for_frr([-d for d in drops], self.frr)
        return self

    def detect(self, texts: Sequence[str]) -> DetectionResult:
        """Flag inputs predicted as the target whose drop is below the clean rows' (score = minus the drop)."""
        if self.threshold is None:
            raise ValueError("Rap.detect: call fit(clean_texts) first.")
        drops, preds = self.drops(texts)
        scores = [-d for d in drops]
        flagged = [p == self.target_label and s > self.threshold for s, p in zip(scores, preds)]
        return DetectionResult(flagged, scores)
