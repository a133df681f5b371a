"""Frequency analysis of fine-tuning: how fast the clean and the backdoor mappings are learned, per frequency band.

This is the *filtering method* of the frequency-principle literature (Xu et al.), as the MuScleLoRA paper uses it to
show that a backdoor mapping is lower-frequency than the clean mapping. For a sample set with inputs `x_i` (flattened,
padded input embeddings) and a function `f` on the samples (the model's output, or the one-hot labels `y`):

    d_ij     = ||x_i - x_j||                          (optionally divided by the mean off-diagonal distance)
    G_ij     = exp(-d_ij / (2 delta)) / sum_k exp(-d_ik / (2 delta))   for each width delta
    f_low    = G f,         f_high = f - f_low
    e_low    = mean_i ||f_low_i - y_low_i||  / mean_i ||y_low_i||
    e_high   = mean_i ||f_high_i - y_high_i|| / mean_i ||y_high_i||

A small `e_low` means the model has fitted the low-frequency part of the target mapping. Running it separately on a
clean dev set and on a triggered dev set (all labelled with the target label) during training shows which mapping
converges first.

The kernels depend only on the inputs, so [`FrequencyAnalyzer`] computes them once; each evaluation is one batched,
no-grad forward pass over the samples. [`FrequencyAnalysisCallback`] runs it inside a `transformers.Trainer`.

Degenerate band: a constant target (the triggered set, every label = target) has no high-frequency part
(`y_high = 0`, because the rows of `G` sum to 1). Its `e_high` denominator is then replaced by `mean_i ||y_i||`, so
`backdoor_high` reads as "high-frequency output norm relative to the label norm" (the high-frequency part of `f` is
all error there). The JSON log records which denominator was used (`"normalizers"`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

DistanceScale = Literal["raw", "mean"]
OutputKind = Literal["probs", "logits"]

#: The 25 kernel widths of the paper's analysis: `linspace(2, 8, 25)`.
DEFAULT_DELTAS: tuple[float, ...] = tuple(float(d) for d in np.linspace(2.0, 8.0, 25))

#: Names of the four relative errors, in the order of the paper's figure.
ERROR_NAMES: tuple[str, ...] = ("backdoor_low", "clean_low", "backdoor_high", "clean_high")

LOG_JSON = "frequency_log.json"
LOG_CSV = "frequency_log.csv"

_EPS = 1e-8


def _as_2d(name: str, values: Union[torch.Tensor, np.ndarray, Sequence]) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.ndim == 1:
        tensor = tensor[:, None]
    if tensor.ndim < 1 or tensor.shape[0] == 0:
        raise ValueError(f"`{name}` must hold at least one sample, got shape {tuple(tensor.shape)}.")
    return tensor.reshape(tensor.shape[0], -1).to(torch.float64)


def _validate_deltas(deltas: Sequence[float]) -> torch.Tensor:
    values = torch.as_tensor(list(deltas), dtype=torch.float64)
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"`deltas` must be a non-empty list of positive numbers, got {deltas!r}.")
    if not bool(torch.isfinite(values).all()) or bool((values <= 0).any()):
        raise ValueError(f"`deltas` must hold finite positive numbers, got {deltas!r}.")
    return values


def pairwise_distances(inputs: Union[torch.Tensor, np.ndarray], distance_scale: DistanceScale = "raw") -> torch.Tensor:
    """Euclidean distances between the flattened samples of `inputs` (first axis = samples), in float64.

    Args:
        inputs: `(N, ...)` array; every sample is flattened to one vector.
        distance_scale: `"raw"` keeps the distances as they are; `"mean"` divides them by the mean off-diagonal
            distance, so kernel widths mean the same thing for models whose embeddings have different norms.

    Example:
        >>> pairwise_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
        tensor([[0., 5.],
                [5., 0.]], dtype=torch.float64)
    """
    if distance_scale not in ("raw", "mean"):
        raise ValueError(f"`distance_scale` must be 'raw' or 'mean', got {distance_scale!r}.")
    x = _as_2d("inputs", inputs)
    distances = torch.cdist(x, x)
    distances.fill_diagonal_(0.0)
    if distance_scale == "mean":
        n = x.shape[0]
        if n < 2:
            raise ValueError("`distance_scale='mean'` needs at least two samples.")
        mean = distances.sum() / (n * (n - 1))
        if mean > 0:
            distances = distances / mean
    return distances


def gaussian_filter_kernels(
    inputs: Union[torch.Tensor, np.ndarray],
    deltas: Sequence[float] = DEFAULT_DELTAS,
    distance_scale: DistanceScale = "raw",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Row-normalised low-pass kernels `G[k]_ij = exp(-d_ij / (2 deltas[k]))`, one per width, shape `(D, N, N)`.

    Each row sums to 1, so `G @ f` is a weighted local average of `f` (its low-frequency part); a larger width
    averages over more neighbours, i.e. keeps only lower frequencies.

    Args:
        inputs: `(N, ...)` sample inputs (flattened per sample).
        deltas: Kernel widths; default `linspace(2, 8, 25)`.
        distance_scale: `"raw"` or `"mean"`, see [`pairwise_distances`].
        dtype: dtype of the returned kernels (float32 halves the memory of large sets).

    Example:
        >>> kernels = gaussian_filter_kernels(torch.randn(5, 3), deltas=[1.0, 2.0])
        >>> kernels.shape, torch.allclose(kernels.sum(-1), torch.ones(2, 5, dtype=torch.float64))
        (torch.Size([2, 5, 5]), True)
    """
    widths = _validate_deltas(deltas)
    distances = pairwise_distances(inputs, distance_scale)
    # Subtract each row's minimum exponent (0, the diagonal) before exp: normalised rows are unchanged, no underflow.
    logits = -distances[None, :, :] / (2.0 * widths[:, None, None])
    logits = logits - logits.max(dim=-1, keepdim=True).values
    kernels = torch.exp(logits)
    kernels = kernels / kernels.sum(dim=-1, keepdim=True)
    return kernels.to(dtype)


def split_frequencies(f: Union[torch.Tensor, np.ndarray], kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a function on the samples into its low- and high-frequency parts: `f_low = G f`, `f_high = f - f_low`.

    Args:
        f: `(N, C)` (or `(N,)`) values of the function on the N samples.
        kernel: `(N, N)` kernel, or `(D, N, N)` for D widths at once (then both parts are `(D, N, C)`).

    Example:
        >>> kernel = gaussian_filter_kernels(torch.randn(4, 2), deltas=[1.0])[0]
        >>> low, high = split_frequencies(torch.ones(4, 1), kernel)  # a constant is all low frequency
        >>> bool(high.abs().max() < 1e-12)
        True
    """
    values = _as_2d("f", f).to(kernel.dtype)
    if kernel.shape[-1] != values.shape[0] or kernel.shape[-2] != values.shape[0]:
        raise ValueError(f"`kernel` of shape {tuple(kernel.shape)} does not match {values.shape[0]} samples of `f`.")
    low = kernel @ values
    return low, values - low


def relative_errors(
    f: Union[torch.Tensor, np.ndarray], y: Union[torch.Tensor, np.ndarray], kernels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Relative low/high-frequency errors of `f` against the target `y`, and the low/high shares of `f`'s norm.

    Returns a dict of tensors with one value per kernel (shape `(D,)`, or `()` for a single `(N, N)` kernel):

    - `low` = mean_i ||f_low_i - y_low_i|| / mean_i ||y_low_i||, `high` likewise;
    - `low_share` = mean_i ||f_low_i|| / mean_i ||f_i||, `high_share` likewise;
    - `low_normalizer`, `high_normalizer`: 1 where the denominator is the band's own label norm, 0 where that band of
      `y` is (numerically) empty and `mean_i ||y_i||` is used instead (e.g. `high` for constant labels).

    Example:
        >>> x = torch.tensor([[0.0], [10.0]])
        >>> kernels = gaussian_filter_kernels(x, deltas=[1e-3])  # so narrow that G is the identity: no low-pass at all
        >>> errors = relative_errors(torch.tensor([[0.5], [1.0]]), torch.tensor([[1.0], [1.0]]), kernels)
        >>> round(float(errors["low"][0]), 3)  # mean |f - y| = 0.25, mean |y| = 1
        0.25
    """
    f_values = _as_2d("f", f)
    y_values = _as_2d("y", y)
    if f_values.shape != y_values.shape:
        raise ValueError(
            f"`f` and `y` must have the same shape, got {tuple(f_values.shape)} and {tuple(y_values.shape)}."
        )
    if kernels.ndim == 3:
        # One width at a time, in float64: a (D, N, N) float64 copy of every kernel would be large for big N.
        parts = [relative_errors(f_values, y_values, kernel) for kernel in kernels]
        return {key: torch.stack([part[key] for part in parts]) for key in parts[0]}
    kernel = kernels.to(torch.float64)
    f_low, f_high = split_frequencies(f_values, kernel)
    y_low, y_high = split_frequencies(y_values, kernel)
    y_norm = y_values.norm(dim=-1).mean()
    f_norm = f_values.norm(dim=-1).mean()

    result: dict[str, torch.Tensor] = {}
    for band, f_band, y_band in (("low", f_low, y_low), ("high", f_high, y_high)):
        denominator = y_band.norm(dim=-1).mean()
        own_band = bool(denominator > _EPS * max(float(y_norm), _EPS))
        if not own_band:
            denominator = torch.clamp(y_norm, min=_EPS)
        result[band] = (f_band - y_band).norm(dim=-1).mean() / denominator
        result[f"{band}_share"] = f_band.norm(dim=-1).mean() / torch.clamp(f_norm, min=_EPS)
        result[f"{band}_normalizer"] = torch.tensor(float(own_band), dtype=torch.float64)
    return result


def _select(inputs: Mapping[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    batch = {key: value[start:stop] for key, value in inputs.items()}
    mask = batch.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        # Drop the columns that are padding for every row of this batch: same outputs, less compute.
        length = max(int(mask.sum(dim=1).max()), 1)
        if bool(mask[:, length:].eq(0).all()):
            batch = {key: (value[:, :length] if value.ndim >= 2 else value) for key, value in batch.items()}
    return batch


class FrequencyAnalyzer:
    """Holds a clean and a triggered sample set (inputs, one-hot labels, kernels) and evaluates a model on both.

    The kernels are computed once, from the model's input embeddings, at the first [`prepare`] / [`evaluate`] and
    cached; later evaluations cost one forward pass over the samples.

    Args:
        clean_inputs: Tokenized clean samples, padded to one fixed length (e.g. `tokenizer(..., padding="max_length",
            max_length=64, truncation=True, return_tensors="pt")`): a mapping of `(N, L)` tensors.
        clean_labels: `(N,)` integer labels of the clean samples.
        backdoor_inputs: Tokenized triggered samples, same layout.
        backdoor_labels: `(M,)` labels of the triggered samples, normally all the target label.
        num_labels: Width of the one-hot labels; must equal the model's output width. Default: max label + 1.
        deltas: Kernel widths, default `linspace(2, 8, 25)`.
        distance_scale: `"raw"` (the paper) or `"mean"` (distances divided by their mean; comparable across models).
        output: `"probs"` (softmax of the logits, the default) or `"logits"` as the function `f`.
        batch_size: Forward batch size.

    Example:
        >>> import torch
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast
        >>> words = ["[PAD]", "[UNK]", "a", "fine", "dull", "film", "cf"]  # a word-level tokenizer, built offline
        >>> backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        >>> backend.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
        >>> analyzer = FrequencyAnalyzer.from_texts(
        ...     tokenizer, ["a fine film", "a dull film"] * 4, [1, 0] * 4, ["cf a dull film"] * 4, target_label=1,
        ...     samples=None, max_length=6, deltas=[2.0, 5.0, 8.0],
        ... )
        >>> _ = torch.manual_seed(0)
        >>> model = BertForSequenceClassification(
        ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        ...                vocab_size=100)
        ... )
        >>> record = analyzer.evaluate(model)
        >>> len(record["backdoor_low"]), len(record["clean_high"])  # one value per delta
        (3, 3)
        >>> record["backdoor_normalizers"]  # constant target: no high band of its own (see the module docstring)
        {'low': 'own_band', 'high': 'label_norm'}
        >>> 0.0 <= record["clean_acc"] <= 1.0 and 0.0 <= record["backdoor_asr"] <= 1.0
        True
    """

    def __init__(
        self,
        clean_inputs: Mapping[str, torch.Tensor],
        clean_labels: Union[torch.Tensor, Sequence[int]],
        backdoor_inputs: Mapping[str, torch.Tensor],
        backdoor_labels: Union[torch.Tensor, Sequence[int]],
        *,
        num_labels: Optional[int] = None,
        deltas: Sequence[float] = DEFAULT_DELTAS,
        distance_scale: DistanceScale = "raw",
        output: OutputKind = "probs",
        batch_size: int = 64,
    ) -> None:
        if distance_scale not in ("raw", "mean"):
            raise ValueError(f"`distance_scale` must be 'raw' or 'mean', got {distance_scale!r}.")
        if output not in ("probs", "logits"):
            raise ValueError(f"`output` must be 'probs' or 'logits', got {output!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
        self.deltas = [float(d) for d in _validate_deltas(deltas)]
        self.distance_scale = distance_scale
        self.output = output
        self.batch_size = batch_size
        self.inputs = {
            "clean": self._check_inputs("clean_inputs", clean_inputs),
            "backdoor": self._check_inputs("backdoor_inputs", backdoor_inputs),
        }
        labels = {
            "clean": torch.as_tensor(clean_labels, dtype=torch.long).reshape(-1),
            "backdoor": torch.as_tensor(backdoor_labels, dtype=torch.long).reshape(-1),
        }
        for name, value in labels.items():
            if value.numel() != self._num_samples(self.inputs[name]):
                raise ValueError(
                    f"`{name}_labels` has {value.numel()} labels for {self._num_samples(self.inputs[name])} inputs."
                )
            if bool((value < 0).any()):
                raise ValueError(f"`{name}_labels` must be non-negative class indices.")
        max_label = int(max(int(labels["clean"].max()), int(labels["backdoor"].max())))
        if num_labels is None:
            num_labels = max_label + 1
        if num_labels <= max_label:
            raise ValueError(f"`num_labels` is {num_labels!r} but the labels go up to {max_label}.")
        self.num_labels = num_labels
        self.labels = labels
        self.one_hot = {
            name: nn.functional.one_hot(value, num_labels).to(torch.float64) for name, value in labels.items()
        }
        self._kernels: Optional[dict[str, torch.Tensor]] = None
        self.kernel_stats: dict[str, dict[str, Any]] = {}

    @staticmethod
    def _check_inputs(name: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
            raise TypeError(f"`{name}` must be a mapping with an 'input_ids' tensor (tokenizer output).")
        tensors = {key: torch.as_tensor(value) for key, value in inputs.items()}
        lengths = {value.shape[0] for value in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"`{name}` tensors disagree on the number of samples: {sorted(lengths)}.")
        return tensors

    @staticmethod
    def _num_samples(inputs: Mapping[str, torch.Tensor]) -> int:
        return int(inputs["input_ids"].shape[0])

    @classmethod
    def from_texts(
        cls,
        tokenizer: Any,
        clean_texts: Sequence[str],
        clean_labels: Sequence[int],
        backdoor_texts: Sequence[str],
        target_label: int,
        *,
        samples: Optional[int] = 500,
        seed: int = 0,
        max_length: int = 64,
        **kwargs: Any,
    ) -> FrequencyAnalyzer:
        """Build an analyzer from raw texts: draws `samples` rows of each set (seeded), tokenizes at `max_length`.

        `samples=None` keeps every row. The triggered texts are all labelled `target_label`. Further keyword
        arguments go to the constructor (`deltas`, `distance_scale`, `output`, `batch_size`, `num_labels`).
        """
        if len(clean_texts) != len(clean_labels):
            raise ValueError(f"{len(clean_texts)} clean texts but {len(clean_labels)} clean labels.")
        generator = torch.Generator().manual_seed(seed)

        def draw(count: int) -> list[int]:
            if samples is None or samples >= count:
                return list(range(count))
            return sorted(torch.randperm(count, generator=generator)[:samples].tolist())

        clean_rows = draw(len(clean_texts))
        backdoor_rows = draw(len(backdoor_texts))

        def encode(texts: Sequence[str]) -> dict[str, torch.Tensor]:
            encoded = tokenizer(
                list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
            )
            return dict(encoded)

        return cls(
            encode([clean_texts[i] for i in clean_rows]),
            [int(clean_labels[i]) for i in clean_rows],
            encode([backdoor_texts[i] for i in backdoor_rows]),
            [int(target_label)] * len(backdoor_rows),
            **kwargs,
        )

    @property
    def kernels(self) -> Optional[dict[str, torch.Tensor]]:
        """The cached `(D, N, N)` kernels per set (`"clean"`, `"backdoor"`), or None before [`prepare`]."""
        return self._kernels

    @staticmethod
    def _device(model: nn.Module) -> torch.device:
        for parameter in model.parameters():
            return parameter.device
        return torch.device("cpu")

    @torch.no_grad()
    def input_embeddings(self, model: nn.Module, name: str) -> torch.Tensor:
        """The model's input-embedding layer output for the set `name`, `(N, L * hidden)` in float64."""
        embedding = model.get_input_embeddings()
        ids = self.inputs[name]["input_ids"]
        device = self._device(embedding)
        chunks = [
            embedding(ids[start : start + self.batch_size].to(device)).detach().to("cpu", torch.float64)
            for start in range(0, ids.shape[0], self.batch_size)
        ]
        return torch.cat(chunks).reshape(ids.shape[0], -1)

    def prepare(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Compute (once) and cache the kernels of both sets from `model`'s input embeddings."""
        if self._kernels is None:
            kernels, stats = {}, {}
            for name in ("clean", "backdoor"):
                embeddings = self.input_embeddings(model, name)
                kernels[name] = gaussian_filter_kernels(embeddings, self.deltas, self.distance_scale, torch.float32)
                distances = pairwise_distances(embeddings, self.distance_scale)
                n = distances.shape[0]
                off_diagonal = distances[~torch.eye(n, dtype=torch.bool)]
                stats[name] = {
                    "mean_distance": float(off_diagonal.mean()) if n > 1 else 0.0,
                    "min_distance": float(off_diagonal.min()) if n > 1 else 0.0,
                    "max_distance": float(off_diagonal.max()) if n > 1 else 0.0,
                    # How local the filter is: weight of a sample on itself (1/N means G is a plain average).
                    "self_weight": [float(w) for w in kernels[name].diagonal(dim1=-2, dim2=-1).mean(dim=-1)],
                }
            self._kernels, self.kernel_stats = kernels, stats
        return self._kernels

    @torch.no_grad()
    def outputs(self, model: nn.Module, name: str) -> torch.Tensor:
        """The function `f` on the set `name`: `(N, num_labels)` probabilities or logits, float64 on the CPU.

        Runs in eval mode without gradients and restores the model's training mode; consumes no random numbers.
        """
        was_training = model.training
        model.eval()
        try:
            inputs = self.inputs[name]
            mask = inputs.get("attention_mask")
            if mask is not None and mask.ndim == 2:
                # Batch samples of similar length together so little padding is computed; order is restored below.
                order = torch.argsort(mask.sum(dim=1), stable=True)
                inputs = {key: value[order] for key, value in inputs.items()}
            else:
                order = None
            device = self._device(model)
            logits = []
            for start in range(0, self._num_samples(inputs), self.batch_size):
                batch = _select(inputs, start, start + self.batch_size)
                out = model(**{key: value.to(device) for key, value in batch.items()})
                logits.append(
                    (out["logits"] if isinstance(out, Mapping) else out[0]).detach().to("cpu", torch.float64)
                )
        finally:
            model.train(was_training)
        values = torch.cat(logits)
        if order is not None:
            values = values[torch.argsort(order)]
        if values.shape[-1] != self.num_labels:
            raise ValueError(
                f"The model outputs {values.shape[-1]} logits per sample, but num_labels={self.num_labels}."
            )
        return values.softmax(dim=-1) if self.output == "probs" else values

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Relative errors of `model` on both sets, one value per delta, plus accuracy on each set.

        Returns a JSON-ready dict: `clean_low`, `clean_high`, `backdoor_low`, `backdoor_high` (lists over
        `self.deltas`), the matching `*_low_share` / `*_high_share` lists, `clean_acc` (accuracy on the clean
        samples) and `backdoor_asr` (share of triggered samples predicted as their (target) label).
        """
        kernels = self.prepare(model)
        record: dict[str, Any] = {}
        for name in ("clean", "backdoor"):
            f = self.outputs(model, name)
            errors = relative_errors(f, self.one_hot[name], kernels[name])
            for key in ("low", "high", "low_share", "high_share"):
                record[f"{name}_{key}"] = [float(v) for v in errors[key]]
            record[f"{name}_normalizers"] = {
                "low": "own_band" if bool(errors["low_normalizer"].all()) else "label_norm",
                "high": "own_band" if bool(errors["high_normalizer"].all()) else "label_norm",
            }
            accuracy = float((f.argmax(dim=-1) == self.labels[name]).to(torch.float64).mean())
            record["clean_acc" if name == "clean" else "backdoor_asr"] = accuracy
        return record

    def metadata(self) -> dict[str, Any]:
        """The settings recorded in a frequency log."""
        return {
            "deltas": self.deltas,
            "distance_scale": self.distance_scale,
            "output": self.output,
            "num_samples": {name: self._num_samples(self.inputs[name]) for name in ("clean", "backdoor")},
            "num_labels": self.num_labels,
            "kernel_stats": self.kernel_stats,
        }


def _nearest_delta_index(deltas: Sequence[float], delta: Optional[float]) -> int:
    if delta is None:
        return len(deltas) // 2
    return int(np.argmin([abs(d - delta) for d in deltas]))


class FrequencyAnalysisCallback(TrainerCallback):
    """Record the clean / backdoor low- and high-frequency relative errors during `Trainer` training.

    At train begin (step 0) and every `every_n_steps` optimizer steps it evaluates the [`FrequencyAnalyzer`] on the
    model, appends a record to `frequency_log.json` and `frequency_log.csv` in `output_dir` (default: the
    Trainer's `output_dir`), and adds a summary at one delta (`freq/backdoor_low`, `freq/clean_low`,
    `freq/backdoor_high`, `freq/clean_high`, `freq/clean_acc`, `freq/backdoor_asr`) to `state.log_history` and to the
    next logged line. It observes only: it runs on the main process only, leaves gradients, optimizer and RNG state
    alone (the forward is in eval mode under `no_grad`; the torch RNG states are saved and restored around it) and
    restores `model.train()`.

    Args:
        analyzer: The sample sets to evaluate.
        every_n_steps: Evaluation period in optimizer steps.
        output_dir: Where to write the logs; default `TrainingArguments.output_dir`.
        summary_delta: Delta whose errors are logged to the Trainer (nearest of `analyzer.deltas`); default the
            middle one (5.0 for the default deltas).

    Example:
        >>> import tempfile
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
        >>> _ = torch.manual_seed(0)
        >>> model = BertForSequenceClassification(
        ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        ...                vocab_size=100)
        ... )
        >>> ids = torch.randint(3, 100, (12, 6))
        >>> ids[8:, 0] = 7  # the last four rows carry the "trigger" token 7
        >>> analyzer = FrequencyAnalyzer({"input_ids": ids[:8]}, [0, 1] * 4, {"input_ids": ids[8:]}, [1] * 4,
        ...                              deltas=[2.0, 5.0, 8.0])
        >>> train = [{"input_ids": row, "labels": i % 2} for i, row in enumerate(ids)]
        >>> output_dir = tempfile.TemporaryDirectory()
        >>> args = TrainingArguments(output_dir=output_dir.name, max_steps=2, per_device_train_batch_size=4,
        ...                          use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
        >>> callback = FrequencyAnalysisCallback(analyzer, every_n_steps=1)
        >>> trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
        >>> _ = trainer.train()  # the last logged line carries the freq/* summary at delta 5.0
        {'train_runtime': ..., 'freq/backdoor_low': ..., 'freq/backdoor_asr': ...}
        >>> log = load_frequency_log(output_dir.name)  # <output_dir>/frequency_log.json (and .csv)
        >>> [record["step"] for record in log["records"]], len(log["records"][0]["clean_low"])
        ([0, 1, 2], 3)
        >>> output_dir.cleanup()
    """

    def __init__(
        self,
        analyzer: FrequencyAnalyzer,
        every_n_steps: int = 10,
        output_dir: Optional[Union[str, os.PathLike]] = None,
        summary_delta: Optional[float] = None,
    ) -> None:
        if not isinstance(analyzer, FrequencyAnalyzer):
            raise TypeError(f"`analyzer` must be a FrequencyAnalyzer, got {type(analyzer).__name__}.")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be an integer >= 1, got {every_n_steps!r}.")
        self.analyzer = analyzer
        self.every_n_steps = every_n_steps
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.summary_index = _nearest_delta_index(analyzer.deltas, summary_delta)
        self.records: list[dict[str, Any]] = []
        self._pending_summary: Optional[dict[str, float]] = None

    @property
    def summary_delta(self) -> float:
        """The delta whose errors go to the Trainer's logs."""
        return self.analyzer.deltas[self.summary_index]

    def _evaluate(self, args: TrainingArguments, state: TrainerState, model: Optional[nn.Module]) -> None:
        if model is None or not state.is_world_process_zero:
            return
        if self.records and self.records[-1]["step"] == state.global_step:
            return
        cpu_state = torch.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            record = self.analyzer.evaluate(model)
        finally:
            torch.set_rng_state(cpu_state)
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)
        record = {"step": int(state.global_step), "epoch": float(state.epoch or 0.0), **record}
        self.records.append(record)
        summary = {f"freq/{name}": record[name][self.summary_index] for name in ERROR_NAMES}
        summary["freq/clean_acc"] = record["clean_acc"]
        summary["freq/backdoor_asr"] = record["backdoor_asr"]
        state.log_history.append({**summary, "freq/delta": self.summary_delta, "step": int(state.global_step)})
        self._pending_summary = summary
        self.save(self.output_dir or Path(args.output_dir))

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        """Evaluate the starting point (step 0)."""
        self._evaluate(args, state, model)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        """Evaluate every `every_n_steps` optimizer steps."""
        if state.global_step % self.every_n_steps == 0:
            self._evaluate(args, state, model)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        """Evaluate the final step when it is not a multiple of `every_n_steps`."""
        self._evaluate(args, state, model)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Optional[dict[str, float]] = None,
        **kwargs: Any,
    ) -> None:
        """Add the latest summary to the next logged line (printed and seen by later callbacks)."""
        if logs is not None and self._pending_summary is not None and state.is_world_process_zero:
            logs.update(self._pending_summary)
            self._pending_summary = None

    def as_log(self) -> dict[str, Any]:
        """The log as written to `frequency_log.json`: settings plus one record per evaluation."""
        return {**self.analyzer.metadata(), "summary_delta": self.summary_delta, "records": self.records}

    def save(self, output_dir: Union[str, os.PathLike]) -> Path:
        """Write `frequency_log.json` and `frequency_log.csv` to `output_dir`; returns the JSON path."""
        return save_frequency_log(self.as_log(), output_dir)


CSV_COLUMNS: tuple[str, ...] = (
    "step",
    "epoch",
    "delta",
    "backdoor_low",
    "clean_low",
    "backdoor_high",
    "clean_high",
    "backdoor_low_share",
    "clean_low_share",
    "backdoor_high_share",
    "clean_high_share",
    "clean_acc",
    "backdoor_asr",
)


def save_frequency_log(log: Mapping[str, Any], output_dir: Union[str, os.PathLike]) -> Path:
    """Write a frequency log as `frequency_log.json` and as a long-format `frequency_log.csv` (one row per step and
    delta, columns [`CSV_COLUMNS`]). Returns the JSON path."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / LOG_JSON
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(log, indent=1))
    tmp.replace(json_path)
    with open(directory / LOG_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for record in log["records"]:
            for index, delta in enumerate(log["deltas"]):
                row = []
                for column in CSV_COLUMNS:
                    if column == "delta":
                        row.append(delta)
                    elif isinstance(record.get(column), list):
                        row.append(record[column][index])
                    else:
                        row.append(record.get(column, ""))
                writer.writerow(row)
    return json_path


def load_frequency_log(path: Union[str, os.PathLike, Mapping[str, Any]]) -> dict[str, Any]:
    """Load a frequency log from a directory holding `frequency_log.json`, from the JSON file, or pass a loaded log.

    Example:
        >>> log = {"deltas": [5.0], "records": [{"step": 0, "backdoor_low": [0.9], "clean_low": [0.4]}]}
        >>> load_frequency_log(log)
        Traceback (most recent call last):
        ValueError: Record at step 0 lacks 'backdoor_high' for every delta.

    [`FrequencyAnalysisCallback`]'s example writes and reloads a complete log.
    """
    if isinstance(path, Mapping):
        log = dict(path)
    else:
        file = Path(path)
        if file.is_dir():
            file = file / LOG_JSON
        if not file.is_file():
            raise FileNotFoundError(
                f"No frequency log at {str(path)!r} (expected a directory with {LOG_JSON} or the file)."
            )
        log = json.loads(file.read_text())
    missing = [key for key in ("deltas", "records") if key not in log]
    if missing:
        raise ValueError(f"Not a frequency log: missing {missing}.")
    for record in log["records"]:
        for name in ERROR_NAMES:
            if name not in record or len(record[name]) != len(log["deltas"]):
                raise ValueError(f"Record at step {record.get('step')!r} lacks {name!r} for every delta.")
    return log


__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_DELTAS",
    "ERROR_NAMES",
    "FrequencyAnalysisCallback",
    "FrequencyAnalyzer",
    "gaussian_filter_kernels",
    "load_frequency_log",
    "pairwise_distances",
    "relative_errors",
    "save_frequency_log",
    "split_frequencies",
]
