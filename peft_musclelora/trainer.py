"""Gradient alignment for any `transformers.Trainer`: the mixin, [`MuScleLoraTrainer`] and its arguments."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import math
import numbers
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union, get_args

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Subset
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .answer_classes import answer_class_indices, answer_class_log_probs
from .bias_refit import refit_output_bias
from .bnb import keep_4bit_weights_trainable
from .gradient_alignment import AlignmentStats, Branch, GradientAlignmentArguments, _is_dtensor, align_gradients
from .row_filter import (
    CLASS_LABEL_GUARDS,
    ROW_FILTER_FILE,
    SHALLOW_PRIOR_COLUMN,
    TEACHER_COLUMN,
    TEACHER_ONLY_COLUMN,
    TEACHER_ROW_GATE_COLUMN,
    UNLEARN_TARGETS,
    RowFilterArguments,
    RowSignalCollator,
    isolated_rows_decision,
    isolation_evidence,
    plain_training,
    run_row_filter,
    saved_expert_log_probs,
    subset_rows,
    trained_rows,
    unlearn_target_names,
    with_column,
)
from .shallow_probe import (
    SHALLOW_EXPERT_LOSSES,
    TEACHER_MIX_GATES,
    mixed_targets,
    product_of_experts_token_loss,
    soft_cross_entropy,
)
from .unlearning import run_unlearning
from .weight_averaging import WEIGHT_AVERAGE_DIR, WeightAverageCallback

# Resumable GA state, in a folder of its own inside each checkpoint so the Trainer's weight loading never sees it:
# JSON for the sampler and scalars, safetensors for the cached reference gradient (nothing is pickled); under FSDP2 the
# sharded reference gradient is a torch.distributed.checkpoint folder instead (each rank writes its shard).
logger = logging.get_logger(__name__)

GA_STATE_DIR = "gradient_alignment"
GA_STATE_NAME = "state.json"
GA_REF_GRADS_NAME = "ref_grads.safetensors"
GA_REF_GRADS_DCP_DIR = "ref_grads_dcp"  # FSDP2: sharded reference gradients, one torch.distributed.checkpoint folder


@dataclass
class MuScleLoraTrainingArguments(TrainingArguments, GradientAlignmentArguments, RowFilterArguments):
    """`TrainingArguments` plus the gradient-alignment fields of [`GradientAlignmentArguments`] and the row-filter
    fields of [`RowFilterArguments`].

    Example (the published BERT-size recipe):

    >>> args = MuScleLoraTrainingArguments(
    ...     output_dir="out", gradient_alignment=True, reference_split_size=96, ga_warmup_epochs=1,
    ...     max_raw_grad_ratio=0.1, min_ref_loss=0.4, num_train_epochs=10, learning_rate=2e-5,
    ... )
    >>> args.min_ref_grad_norm
    5e-07
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        epoch_bounded = self.max_steps is None or self.max_steps <= 0
        self.validate_gradient_alignment_args(self.num_train_epochs if epoch_bounded else None)
        self.validate_row_filter_args()


@contextlib.contextmanager
def _dropout_disabled(model: torch.nn.Module) -> Any:
    """Every module in eval mode (dropout off) except those that hold `gradient_checkpointing`, restored on exit.

    transformers checks `self.gradient_checkpointing and self.training` on the module that owns the flag, so keeping
    only those modules in train mode keeps activation memory the same as in the training pass.
    """
    saved = [(module, module.training) for module in model.modules()]
    try:
        for module, _ in saved:
            module.training = getattr(module, "gradient_checkpointing", False) is True
        yield
    finally:
        for module, training in saved:
            module.training = training


def reference_split_indices(
    num_rows: int, size: int, seed: int, labels: Optional[list[int]] = None
) -> tuple[list[int], list[int]]:
    """Seeded split of `num_rows` row indices into `size` reference rows and the rest, both sorted.

    This is the split `reference_split_size` makes; the benchmark's baselines use it too, so that `clean-only`
    trains on exactly the rows gradient alignment uses as references. With the same seed, a larger `size` contains
    every row of a smaller one (both are prefixes of one permutation).

    With `labels` (one class id per row; `reference_stratify=True`) the split is stratified: each label gets its
    share of `size` by [`stratified_quotas`], filled with that label's rows in the order of the same permutation.

    Example:

    >>> reference_split_indices(6, 2, seed=0)
    ([2, 5], [0, 1, 3, 4])
    >>> reference_split_indices(6, 2, seed=0, labels=[1, 1, 0, 1, 1, 0])  # rows 2 and 5 are both label 0
    ([2, 3], [0, 1, 4, 5])
    """
    permutation = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    if labels is None:
        return sorted(permutation[:size]), sorted(permutation[size:])
    if len(labels) != num_rows:
        raise ValueError(f"labels has {len(labels)} entries for {num_rows} rows; expected one label per row.")
    quotas = stratified_quotas(Counter(labels), size)
    chosen: list[int] = []
    for index in permutation:
        if quotas[labels[index]] > 0:
            quotas[labels[index]] -= 1
            chosen.append(index)
    taken = set(chosen)
    return sorted(chosen), [index for index in range(num_rows) if index not in taken]


def stratified_quotas(counts: Mapping[int, int], size: int) -> dict[int, int]:
    """How many of `size` rows each label gets in a stratified split of rows with these label `counts`.

    Proportional shares rounded by largest remainder (ties to the smaller label); then, when `size` allows, a
    label whose share rounded to zero takes one row from the label with the largest quota, so every label has at
    least one reference row. The quotas sum to `size` (at most the number of rows).

    Example:

    >>> stratified_quotas({0: 90, 1: 10}, 10)
    {0: 9, 1: 1}
    >>> stratified_quotas({0: 97, 1: 2, 2: 1}, 5)  # the rare labels keep a row each
    {0: 3, 1: 1, 2: 1}
    """
    total = sum(counts.values())
    if not 0 <= size <= total:
        raise ValueError(f"size must be in [0, {total}] (the rows), got {size}.")
    exact = {label: size * count / total for label, count in sorted(counts.items())}
    quotas = {label: math.floor(share) for label, share in exact.items()}
    by_remainder = sorted(exact, key=lambda label: (-(exact[label] - quotas[label]), label))
    for label in by_remainder[: size - sum(quotas.values())]:
        quotas[label] += 1
    for label in sorted(quotas):
        largest = max(quotas, key=lambda other: (quotas[other], -other))
        if quotas[label] == 0 and counts[label] > 0 and quotas[largest] > 1:
            quotas[label], quotas[largest] = 1, quotas[largest] - 1
    return quotas


class _ReferenceSampler:
    """Seeded, resumable cycle over `n` reference indices: a fresh permutation (seed + cycle) per pass."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.cycle, self.position = 0, 0
        self._perm: Optional[list[int]] = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            generator = torch.Generator().manual_seed(self.seed + self.cycle)
            self._perm = torch.randperm(self.n, generator=generator).tolist()
        return self._perm

    def take(self, count: int) -> list[int]:
        indices: list[int] = []
        while len(indices) < count:
            perm = self._permutation()
            step = min(count - len(indices), self.n - self.position)
            indices.extend(perm[self.position : self.position + step])
            self.position += step
            if self.position == self.n:
                self.cycle, self.position, self._perm = self.cycle + 1, 0, None
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "cycle": self.cycle, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(
                f"The checkpoint's reference sampler (n={state['n']}, seed={state['seed']}) does not match this run's "
                f"reference set (n={self.n}, seed={self.seed}); resume with the same reference data and seed."
            )
        self.cycle, self.position, self._perm = state["cycle"], state["position"], None


def _columns(dataset: Any) -> Optional[set[str]]:
    """Column names of a `datasets.Dataset`, or the keys of a torch dataset's first (dict) item; None if unknown."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):
        return set(names)
    try:
        first = dataset[0]
    except Exception:  # noqa: BLE001 - any indexing failure just means "columns unknown"
        return None
    return set(first) if isinstance(first, dict) else None


def _label_column(dataset: Any) -> tuple[Optional[str], list[Any]]:
    """The `labels` (or `label`) column of a `datasets.Dataset` or of a torch dataset of dicts, and its values."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):
        column = next((c for c in ("labels", "label") if c in names), None)
        return column, list(dataset[column]) if column else []
    first = dataset[0] if len(dataset) else None
    column = next((c for c in ("labels", "label") if c in first), None) if isinstance(first, dict) else None
    return column, [dataset[i][column] for i in range(len(dataset))] if column else []


def _class_index(value: Any) -> int:
    """One class index from a label value (int or 0-d tensor); `TypeError`/`ValueError` for anything else."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"a label of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"a label of type {type(value).__name__}")
    return int(value)


def row_class_labels(dataset: Any, name: str = "eval_dataset") -> list[int]:
    """One class index per row of `dataset` (its `labels` or `label` column), for a stratified reference split.

    Raises a one-line `ValueError` naming the dataset and row when a row has no single class label (a causal LM's
    token `labels`, a missing column).
    """
    column, values = _label_column(dataset)
    if column is None:
        raise ValueError(f"`reference_stratify=True` needs a `labels` or `label` column in {name}; it has none.")
    labels = []
    for row, value in enumerate(values):
        try:
            labels.append(_class_index(value))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"`reference_stratify=True` needs one class label per row; {name} row {row} has {error} in "
                f"{column!r} (token labels of a language model cannot be stratified)."
            ) from None
    return labels


def _check_reference_labels(dataset: Any, model: torch.nn.Module) -> None:
    """Refuse reference labels outside `[0, num_labels)` of a sequence classifier when the trainer is built.

    Otherwise the first reference pass fails deep inside torch's cross-entropy (an IndexError many frames down, or a
    device-side assert on GPU). Only classifiers are checked: a causal LM's `labels` are token ids.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if not type(inner).__name__.endswith("ForSequenceClassification") or not num_labels or num_labels < 2:
        return
    if getattr(config, "problem_type", None) in ("regression", "multi_label_classification"):
        return
    column, values = _label_column(dataset)
    for row, value in enumerate(values):
        try:
            label = _class_index(value)
        except (TypeError, ValueError):  # not one class index per row (e.g. token ids): not checked
            return
        if not 0 <= label < num_labels:
            raise ValueError(
                f"reference_dataset row {row}: field {column!r} = {label} is out of range for the model's "
                f"num_labels={num_labels} (expected 0..{num_labels - 1})."
            )


#: The row-filter switches that need one class label per row (the output bias they refit is a classifier's).
_CLASS_LABEL_SWITCHES = ("row_filter_refit_bias", "row_filter_unlearn_refit_bias")


def _check_row_filter_fits_the_model(row_filter_args: RowFilterArguments, model: torch.nn.Module) -> None:
    """Refuse, when the trainer is built, what a causal LM cannot do and would otherwise fail at only after the whole
    training run: an unlearning target that masks the trigger (its loss compares one class prediction per row with
    the trigger masked out, which token-level logits do not have) and a bias refit (a classifier's output bias)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not type(inner).__name__.endswith("ForCausalLM"):
        return
    target = row_filter_args.row_filter_unlearn_target
    if row_filter_args.row_filter_unlearn and UNLEARN_TARGETS[target].masks_trigger:
        raise ValueError(
            f"`row_filter_unlearn_target={target!r}` compares class predictions with the trigger masked out and "
            f"works on class labels only; {type(inner).__name__} has token-level labels: use "
            f"{unlearn_target_names(lambda each: not each.masks_trigger)}."
        )
    guard = row_filter_args.row_filter_unlearn_guard
    if row_filter_args.row_filter_unlearn and guard in CLASS_LABEL_GUARDS:
        raise ValueError(
            f"`row_filter_unlearn_guard={guard!r}` reads class log-probabilities and works on class labels only; "
            f"{type(inner).__name__} has token-level labels: leave it 'accuracy'."
        )
    for name in _CLASS_LABEL_SWITCHES:
        if getattr(row_filter_args, name):
            raise ValueError(
                f"`{name}=True` refits a classifier's output bias and works on class labels only; "
                f"{type(inner).__name__} has token-level labels: leave it False."
            )


SUPPORTED_ENGINES = (
    "single device, DDP, or FSDP2 (`torch.distributed.fsdp.fully_shard`; in accelerate `fsdp_version: 2`, "
    "see docs/distributed.md)"
)


def _check_distributed_engine(trainer: Any) -> None:
    """Refuse the engines whose gradients gradient alignment cannot project: DeepSpeed and FSDP1.

    FSDP1 flattens every wrapped module's parameters into one `FlatParameter` and shards that, so a shard mixes
    pieces of several tensors and the per-tensor sums cannot be formed; DeepSpeed's ZeRO partitions and reduces
    gradients inside its own engine, out of the Trainer's reach. FSDP2 keeps one DTensor per parameter.
    """
    if trainer.is_deepspeed_enabled:
        raise ValueError(
            "`gradient_alignment=True` is not supported with DeepSpeed (its ZeRO engine partitions and reduces the "
            f"gradients out of reach of a per-tensor projection); supported: {SUPPORTED_ENGINES}."
        )
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            f"`gradient_alignment=True` is not supported with FSDP1 (fsdp_version="
            f"{getattr(plugin, 'fsdp_version', 1)!r}: flattened, sharded parameters mix several tensors); use FSDP2 "
            f"(`fsdp_version: 2` in the accelerate config, or `fsdp_config={{'fsdp_version': 2}}`); supported: "
            f"{SUPPORTED_ENGINES}."
        )


def _check_not_fsdp1(model: torch.nn.Module) -> None:
    """Refuse a model wrapped by hand in FSDP1's `FullyShardedDataParallel` (see [`_check_distributed_engine`])."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ValueError(
            "Gradient alignment is not supported on a model wrapped in FSDP1's `FullyShardedDataParallel` (its "
            f"flattened parameter shards mix several tensors); shard it with FSDP2's `fully_shard` instead. "
            f"Supported: {SUPPORTED_ENGINES}."
        )


class GradientAlignmentMixin:
    """Adds MuScleLoRA's gradient alignment to any `transformers.Trainer` subclass (put it first in the bases).

    Per optimisation step, after the (accumulated) training gradient `g` exists and before the Trainer clips it, one
    batch of trusted clean reference samples is differentiated with `torch.autograd.grad` over the trainable
    parameters (leaving `.grad` untouched), and [`align_gradients`] replaces `g` tensor by tensor. Clipping, the
    optimiser and the scheduler then run unchanged. Under DDP the reference gradient is all-reduced; under FSDP2
    (DTensor parameters) it comes from a backward into `.grad` with the training shards set aside, and alignment
    works on the local shards with one all-reduce of its sums (docs/distributed.md). FSDP1 and DeepSpeed are refused.

    Extra constructor keywords (everything else goes to the wrapped trainer):
        reference_dataset: The clean reference set, in the form the data collator accepts (tokenized like the
            training set). Alternatively set `reference_split_size` to split it off `eval_dataset`.
        gradient_alignment_args: A [`GradientAlignmentArguments`], when `args` is not already one (e.g. a plain
            `SFTConfig`). When neither is given, the defaults are used.
        row_filter_args: A [`RowFilterArguments`], when `args` is not already one: fit-gap row filtering before
            training (`row_filter=True`), calibrated on the same reference set.

    After construction `trainer.reference_dataset` holds the reference set and `trainer.eval_dataset` what is left of
    the evaluation set.

    Example:

    >>> from trl import SFTTrainer
    >>> class DefendedSFTTrainer(GradientAlignmentMixin, SFTTrainer):
    ...     pass
    >>> trainer = DefendedSFTTrainer(model=model, args=sft_config, train_dataset=train, reference_dataset=clean,
    ...                              gradient_alignment_args=GradientAlignmentArguments(ga_every_n_steps=2))
    ... # doctest: +SKIP
    """

    def __init__(
        self,
        *args: Any,
        reference_dataset: Optional[TorchDataset] = None,
        gradient_alignment_args: Optional[GradientAlignmentArguments] = None,
        row_filter_args: Optional[RowFilterArguments] = None,
        **kwargs: Any,
    ) -> None:
        bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments
        training_args = bound.get("args")
        self.row_filter_args = _row_filter_args(training_args, row_filter_args)
        if isinstance(training_args, GradientAlignmentArguments):
            if gradient_alignment_args is not None:
                raise ValueError(
                    "`gradient_alignment_args` must be None when `args` is already a GradientAlignmentArguments "
                    f"({type(training_args).__name__}); set the fields on `args` instead."
                )
            ga_args = training_args
        else:
            ga_args = gradient_alignment_args if gradient_alignment_args is not None else GradientAlignmentArguments()
            if not isinstance(ga_args, GradientAlignmentArguments):
                raise TypeError(
                    f"`gradient_alignment_args` must be a GradientAlignmentArguments, got {type(ga_args).__name__}."
                )
        raw_train_dataset = bound.get("train_dataset")

        super().__init__(*args, **kwargs)

        keep_4bit_weights_trainable(self.model)  # evaluation passes must not freeze a 4-bit model on CPU
        _check_row_filter_fits_the_model(self.row_filter_args, self.model)
        self.ga_args = ga_args
        self._row_filter_source: Any = None  # the unfiltered training set, once train() has filtered it
        self._response_classes: Optional[list[tuple[int, ...]]] = None  # token-level expert and teacher
        self.row_filter_report: Optional[dict[str, Any]] = None
        if ga_args is not training_args:
            epoch_bounded = self.args.max_steps is None or self.args.max_steps <= 0
            ga_args.validate_gradient_alignment_args(self.args.num_train_epochs if epoch_bounded else None)
        self.reference_dataset = self._resolve_reference_dataset(reference_dataset, raw_train_dataset)
        self._ga_param_names = self._select_ga_parameters() if ga_args.gradient_alignment else []
        if ga_args.gradient_alignment:
            _check_distributed_engine(self)
        self._reset_gradient_alignment_state()
        decay = self.row_filter_args.row_filter_weight_average_decay
        self._weight_averaging = None if decay is None else WeightAverageCallback(decay, self._trainable_parameters)
        if self._weight_averaging is not None:
            self.add_callback(self._weight_averaging)

    # ---- construction helpers ----

    def _trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        model = self.accelerator.unwrap_model(self.model)
        return {name: param for name, param in model.named_parameters() if param.requires_grad}

    @property
    def _ga_seed(self) -> int:
        seed = self.ga_args.reference_seed
        return self.args.seed if seed is None else seed

    def _resolve_reference_dataset(self, reference_dataset: Any, raw_train_dataset: Any) -> Any:
        split_size = self.ga_args.reference_split_size
        if reference_dataset is not None and split_size is not None:
            raise ValueError(
                f"Pass either `reference_dataset=` or `reference_split_size` (got {split_size!r}), not both."
            )
        if reference_dataset is not None and self.ga_args.reference_stratify:
            raise ValueError(
                "`reference_stratify=True` stratifies the split `reference_split_size` makes; the rows of "
                "`reference_dataset=` are already chosen (set reference_stratify=False, or pass reference_split_size)."
            )
        if split_size is not None and not (self.ga_args.gradient_alignment or self.row_filter_args.row_filter):
            # Nothing would use the reference rows, so taking them out of eval_dataset would only shrink it.
            warnings.warn(
                f"`reference_split_size={split_size}` is ignored: gradient_alignment and row_filter are off, so no "
                "reference rows are taken out of eval_dataset.",
                UserWarning,
                stacklevel=3,
            )
            split_size = None
        if split_size is not None:
            reference_dataset = self._split_reference_from_eval(split_size)
        elif reference_dataset is None:
            if self.row_filter_args.row_filter:
                raise ValueError(
                    "`row_filter=True` calibrates its cut-offs on trusted clean rows: pass `reference_dataset=` to "
                    "the trainer or set `reference_split_size` to take them from `eval_dataset` (or set "
                    "row_filter=False)."
                )
            if self.ga_args.gradient_alignment:
                raise ValueError(
                    "`gradient_alignment=True` needs trusted clean reference samples: pass `reference_dataset=` to "
                    "the trainer or set `reference_split_size` to take them from `eval_dataset` "
                    "(or set gradient_alignment=False)."
                )
            return None
        else:
            reference_columns, train_columns = _columns(reference_dataset), _columns(raw_train_dataset)
            if reference_columns is not None and train_columns is not None and reference_columns != train_columns:
                raise ValueError(
                    f"The reference dataset's columns {sorted(reference_columns)} differ from the training dataset's "
                    f"{sorted(train_columns)}; tokenize the reference samples like the training set."
                )
        if len(reference_dataset) == 0:
            raise ValueError("`reference_dataset` is empty: gradient alignment needs at least one reference sample.")
        _check_reference_labels(reference_dataset, self.model)
        return reference_dataset

    def _split_reference_from_eval(self, split_size: int) -> Any:
        eval_dataset = self.eval_dataset
        if eval_dataset is None:
            raise ValueError(
                f"`reference_split_size={split_size}` takes the reference samples from `eval_dataset`, which is None."
            )
        if isinstance(eval_dataset, dict):
            raise ValueError(
                f"`reference_split_size={split_size}` needs a single `eval_dataset`, got a dict of "
                f"{sorted(eval_dataset)}; pass `reference_dataset=` instead."
            )
        size = len(eval_dataset)
        if split_size > size or (split_size == size and self.args.eval_strategy != "no"):
            raise ValueError(
                f"`reference_split_size` ({split_size}) must be smaller than the eval dataset ({size} rows) so that "
                "rows are left for evaluation (or equal to it with eval_strategy='no')."
            )
        labels = row_class_labels(eval_dataset) if self.ga_args.reference_stratify else None
        reference_idx, rest_idx = reference_split_indices(size, split_size, self._ga_seed, labels)
        if hasattr(eval_dataset, "select"):  # datasets.Dataset
            reference, rest = eval_dataset.select(reference_idx), eval_dataset.select(rest_idx)
        else:
            reference, rest = Subset(eval_dataset, reference_idx), Subset(eval_dataset, rest_idx)
        self.eval_dataset = rest if len(rest_idx) > 0 else None
        return reference

    def _select_ga_parameters(self) -> list[str]:
        names = [name for name, param in self.model.named_parameters() if param.requires_grad]
        pattern = self.ga_args.ga_params
        if pattern is not None:
            names = [name for name in names if re.search(pattern, name)]
            if not names:
                raise ValueError(
                    f"`ga_params={pattern!r}` matches no trainable parameter; trainable parameters are e.g. "
                    f"{[n for n, p in self.model.named_parameters() if p.requires_grad][:5]}."
                )
        if not names:
            raise ValueError("`gradient_alignment=True` but the model has no trainable parameters.")
        return names

    def _reset_gradient_alignment_state(self) -> None:
        n = len(self.reference_dataset) if self.reference_dataset is not None else 0
        self._ga_sampler = _ReferenceSampler(n, self._ga_seed) if n else None
        self._ga_ref_grads: Optional[list[torch.Tensor]] = None
        self._ga_ref_history: list[list[torch.Tensor]] = []  # earlier reference gradients, newest first
        self._ga_ref_loss = math.nan
        self._ga_last_step = -1
        self._ga_log: dict[str, float] = {}
        self._ga_logged_steps = 0
        self._teacher_gate_sum: Any = 0.0  # `row_filter_teacher_mix_gate`: the gate's sum and rows between logs
        self._teacher_gate_rows = 0
        self._ga_reference_source: Any = None
        self._ga_engine_checked = False

    # ---- the hook: align after the accumulated backward, before clipping ----
    #
    # transformers 5.23's `_run_epoch` does, on each sync step: `_clip_grad_norm(model)` (only when
    # max_grad_norm > 0), then `_get_grad_norm(model, grad_norm)`, then `on_pre_optimizer_step` and
    # `optimizer.step()`. An optimizer step pre-hook or `on_pre_optimizer_step` would run after clipping, so GA runs at
    # the top of `_clip_grad_norm`, or, when clipping is off, at the top of `_get_grad_norm` (called with
    # grad_norm=None in that case). Both hooks are methods the Trainer itself provides for overriding; the step
    # guard makes sure each optimisation step is aligned once.

    def _clip_grad_norm(self, model: torch.nn.Module) -> Any:
        self._maybe_align_gradients(model)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        if grad_norm is None:
            self._maybe_align_gradients(model)
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, starting gradient alignment afresh (a resumed run restores it from the checkpoint).

        With `row_filter=True` the fold probes run first (see [`run_row_filter`]) and training sees the kept rows
        only; the decisions are written to `<output_dir>/row_filter.json`. A resumed run
        (`resume_from_checkpoint`) reads that file instead of probing again, so it trains on the same rows. With
        `row_filter_unlearn=True` the rows isolated as fit-early are then unlearned (see
        [`peft_musclelora.unlearning`]); the phase's report is added to `row_filter.json` under `unlearning`. With
        `row_filter_refit_bias=True` the output bias is last refitted on the trusted rows (see
        [`peft_musclelora.bias_refit`]), reported under `bias_refit`; with `row_filter_unlearn_refit_bias=True`,
        only when the unlearning phase ran. With `row_filter_weight_average_decay` the evaluations and checkpoints
        see the average of the weights, and training ends on the average the best checkpoint holds (or the last one)
        before those phases, reported under `weight_average`.
        """
        self._reset_gradient_alignment_state()
        if self.row_filter_args.row_filter:
            self._filter_training_rows(resuming=bool(kwargs.get("resume_from_checkpoint") or (args and args[0])))
        if self._weight_averaging is not None:
            self._weight_averaging.average = None  # a run starts its own average (a resumed one restores its own)
        output = super().train(*args, **kwargs)
        if self._weight_averaging is not None:
            self._end_on_weight_average()
        unlearned = False
        if self.row_filter_args.row_filter_unlearn:
            unlearned = self._unlearn_isolated_rows()
        if self.row_filter_args.row_filter_refit_bias:
            self._refit_output_bias("row_filter_refit_bias")
        elif unlearned and self.row_filter_args.row_filter_unlearn_refit_bias:
            self._refit_output_bias("row_filter_unlearn_refit_bias")
        return output

    def _end_on_weight_average(self) -> None:
        """Leave the model on the average: the best checkpoint's (already loaded, `load_best_model_at_end`) or the
        last one; the average stops there, so later evaluations and phases see the model as it now is."""
        averaging = self._weight_averaging
        average, averaging.average = averaging.average, None
        best = self.state.best_model_checkpoint if self.args.load_best_model_at_end else None
        if best is None and average is not None and average.updates:
            average.copy_to_parameters()
        report = {
            "decay": averaging.decay,
            "updates": 0 if average is None else average.updates,
            "kept": "best checkpoint" if best is not None else "last average",
            "checkpoint": best,
        }
        logger.info("row filter: training ends on the weight average (%s)", report["kept"])
        self.row_filter_report["weight_average"] = report
        self._write_row_filter_report(self.row_filter_report)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """`Trainer.evaluate`; during a run with `row_filter_weight_average_decay`, of the weight average."""
        with self._weight_average_swapped_in():
            return super().evaluate(*args, **kwargs)

    def _weight_average_swapped_in(self) -> contextlib.AbstractContextManager[None]:
        if self._weight_averaging is None:
            return contextlib.nullcontext()
        return self._weight_averaging.swapped_in()

    def _refit_output_bias(self, field_name: str) -> None:
        refit = refit_output_bias(self, self.reference_dataset, field_name)
        logger.info("row filter: output bias %s moved by %s", refit["parameter"], refit["offset"])
        self.row_filter_report["bias_refit"] = refit
        self._write_row_filter_report(self.row_filter_report)
        self.log(
            {f"row_filter/bias_offset_{label}": value for label, value in enumerate(refit["offset"])}
            | {"row_filter/bias_refit_trusted_accuracy": refit["trusted_accuracy_after"]}
        )

    def _unlearn_isolated_rows(self) -> bool:
        """Run the unlearning phase; whether it trained (False: skipped, for want of evidence or isolated rows)."""
        report = self.row_filter_report
        isolated = [row for row, decision in enumerate(report["rows"]) if decision["reason"] == "fit-early"]
        unlearning = run_unlearning(
            self,
            self.row_filter_args,
            kept_dataset=self.train_dataset,
            isolated_dataset=subset_rows(self._row_filter_source, isolated),
            reference_dataset=self.reference_dataset,
            seed=self._ga_seed,
            progress=not self.args.disable_tqdm,
            evidence=isolation_evidence(report["summary"], self.row_filter_args.row_filter_unlearn_significance),
        )
        if unlearning["skipped"] is not None:
            logger.info("row filter: unlearning skipped: %s", unlearning["skipped"])
        report["unlearning"] = unlearning
        self._write_row_filter_report(report)
        self.log(
            {
                f"row_filter/unlearn_{key}": float(unlearning[key])
                for key in ("isolated", "chosen_step", "guard_start", "guard_end")
                if unlearning[key] is not None
            }
            | {"row_filter/unlearn_skipped": float(unlearning["skipped"] is not None)}
            | ({"row_filter/unlearn_evidence_z": unlearning["evidence"]["z"]} if unlearning["evidence"] else {})
            | (
                {"row_filter/unlearn_trigger_tokens": float(len(unlearning["trigger_tokens"]))}
                if "trigger_tokens" in unlearning
                else {}
            )
        )
        return unlearning["skipped"] is None

    def _write_row_filter_report(self, report: dict[str, Any]) -> None:
        if not self.args.should_save:
            return
        path = os.path.join(self.args.output_dir, ROW_FILTER_FILE)
        os.makedirs(self.args.output_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as file:
            json.dump(report, file)
        os.replace(tmp, path)

    def _filter_training_rows(self, resuming: bool) -> None:
        if self.args.world_size > 1:
            raise ValueError(
                "`row_filter=True` runs its probes in one process and is not supported in distributed training "
                f"(world_size={self.args.world_size}); filter once on one process and train on the kept rows."
            )
        if self._row_filter_source is None:
            self._row_filter_source = self.train_dataset
        self.train_dataset = self._row_filter_source
        path = os.path.join(self.args.output_dir, ROW_FILTER_FILE)
        report = None
        if resuming and os.path.isfile(path):
            with open(path) as file:
                report = json.load(file)
            if report.get("summary", {}).get("rows") != len(self.train_dataset):
                raise ValueError(
                    f"{path} holds decisions for {report.get('summary', {}).get('rows')!r} rows, the training set has "
                    f"{len(self.train_dataset)}: resume with the training set it was made for."
                )
            saved_action = report["summary"].get("contradicted_action", "drop")  # older reports: always dropped
            if saved_action != self.row_filter_args.row_filter_contradicted:
                raise ValueError(
                    f"{path} was made with row_filter_contradicted={saved_action!r}, this run asks for "
                    f"{self.row_filter_args.row_filter_contradicted!r}: resume with the setting it was made for."
                )
        if report is None:
            report = run_row_filter(
                self, self.row_filter_args, self.reference_dataset, self._ga_seed, progress=not self.args.disable_tqdm
            )
            self._write_row_filter_report(report)
        self.row_filter_report = report
        self._row_filter_log = {
            f"row_filter/{key}": float(value)
            for key, value in report["summary"].items()
            if key in ("kept", "fit_early", "contradicted", "low_cut", "high_cut", "reference_flagged")
            and value is not None  # a high_cut of None: the contradicted side does not cut
        }
        self._isolated_rows_decision(report)
        indices, teacher_only = trained_rows(report, self.row_filter_args.row_filter_contradicted)
        kept = subset_rows(self.train_dataset, indices)
        plain = self._kept_rows_train_plainly(report)
        if self.row_filter_args.row_filter_shallow_expert and not plain:
            kept = _with_shallow_prior(kept, report, indices, path, self.row_filter_args)
        if self.row_filter_args.row_filter_teacher_mix is not None and not plain:
            kept = _with_teacher(kept, report, indices, path)
            if self.row_filter_args.row_filter_teacher_row_gate is not None:
                kept = _with_teacher_row_gate(kept, report, indices, path)
        if TEACHER_ONLY_COLUMN in _row_signal_columns(self.row_filter_args):
            kept = with_column(kept, TEACHER_ONLY_COLUMN, teacher_only)
        classes = report["summary"].get("response_classes")
        self._response_classes = None if classes is None else [tuple(c) for c in classes]
        if _row_signal_columns(self.row_filter_args) and not isinstance(self.data_collator, RowSignalCollator):
            self.data_collator = RowSignalCollator(self.data_collator)
        self.train_dataset = kept

    def _isolated_rows_decision(self, report: dict[str, Any]) -> None:
        """Put this run's `row_filter_keep_isolated_without_evidence` decision in `report` (and its file) under
        `isolated_rows`, where [`~row_filter.trained_rows`] reads it; remove a resumed report's when the knob is
        off."""
        decision = isolated_rows_decision(report["summary"], self.row_filter_args)
        if report.get("isolated_rows") != decision:
            if decision is None:
                del report["isolated_rows"]
            else:
                report["isolated_rows"] = decision
            self._write_row_filter_report(report)
        if decision is None:
            return
        self._row_filter_log["row_filter/isolated_kept"] = float(decision["kept"])
        logger.info(
            "row filter: the %d rows isolated as fit-early %s (z = %.2f, a shortcut above %.2f)",
            report["summary"]["fit_early"],
            "train as kept rows" if decision["kept"] else "are dropped",
            decision["evidence"]["z"],
            decision["evidence"]["threshold"],
        )

    def _kept_rows_train_plainly(self, report: dict[str, Any]) -> bool:
        """Whether `row_filter_plain_significance` lets the kept rows train on their labels alone; the decision
        and its evidence are added to `report` (and its file) under `plain_training`."""
        decision = plain_training(report["summary"], self.row_filter_args)
        if decision is None:
            return False
        evidence = decision["evidence"]
        if report.get("plain_training") != decision:  # a resumed report made under another setting
            report["plain_training"] = decision
            self._write_row_filter_report(report)
        logger.info(
            "row filter: the kept rows train %s (%.2f%% of the training rows isolated against %.2f%% of the trusted "
            "rows, z = %.2f, plain above %.2f)",
            "on their labels alone" if evidence["passed"] else "with the shallow expert and the teacher",
            100 * evidence["isolated_share"],
            100 * evidence["reference_share"],
            evidence["z"],
            evidence["threshold"],
        )
        self._row_filter_log["row_filter/plain_training"] = float(evidence["passed"])
        return evidence["passed"]

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        missing = [c for c in _row_signal_columns(self.row_filter_args) if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *missing]

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        """The parent's loss; for a batch of rows with the shallow probe's log-probabilities
        (`row_filter_shallow_expert`), the loss `row_filter_shallow_expert_loss` names: the product-of-experts
        cross-entropy `CE(log_softmax(logits) + weight * log p_shallow)` with `row_filter_shallow_expert_weight` (the
        shallow expert is fixed: only the model learns, and only from what the shallow probe does not explain), or
        the model's own cross-entropy reweighted per row ([`~shallow_probe.reweighted_loss`]). For causal-LM logits
        the product of experts acts on the response tokens where the answer set branches
        ([`~shallow_probe.product_of_experts_token_loss`]). For a batch with the trusted teacher's log-probabilities
        (`row_filter_teacher_mix`), each row's target is its one-hot label mixed with the teacher's distribution
        ([`~shallow_probe.mixed_targets`])."""
        # A Mapping, not a dict: DataCollatorWithPadding returns a BatchEncoding (a UserDict).
        mapping = isinstance(inputs, Mapping)
        prior = inputs.pop(SHALLOW_PRIOR_COLUMN, None) if mapping else None
        teacher = inputs.pop(TEACHER_COLUMN, None) if mapping else None
        teacher_only = inputs.pop(TEACHER_ONLY_COLUMN, None) if mapping else None
        row_gate = inputs.pop(TEACHER_ROW_GATE_COLUMN, None) if mapping else None
        if prior is None and teacher is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self.compute_loss_func is not None or getattr(self, "label_smoother", None) is not None:
            raise ValueError(
                "`row_filter_shallow_expert=True` and `row_filter_teacher_mix` compute their own loss and do not "
                "combine with compute_loss_func or label_smoothing_factor; unset them."
            )
        labels = inputs.pop("labels")
        weight = self.row_filter_args.row_filter_shallow_expert_weight
        if labels.dim() == 2:  # causal-LM labels: the expert and the teacher act on the answer tokens
            if prior is not None and self.row_filter_args.row_filter_shallow_expert_loss != "product":
                raise ValueError(
                    "`row_filter_shallow_expert_loss` must be 'product' for token-level (causal-LM) labels, got "
                    f"{self.row_filter_args.row_filter_shallow_expert_loss!r}: the others need one class label per "
                    "row."
                )
            classes = self._response_classes
            if classes is None:
                raise ValueError(
                    "a batch with token-level labels carries the row filter's per-row predictions, but its report "
                    f"({os.path.join(self.args.output_dir, ROW_FILTER_FILE)}) names no response classes: it was made "
                    "for classification labels. Delete it to probe again."
                )
            outputs = model(**inputs, use_cache=False)
            targets = None
            if teacher is not None:
                class_labels = answer_class_indices(labels, classes)
                scores = functools.partial(answer_class_log_probs, outputs.logits, labels, classes, class_labels)
                share = self._teacher_share(scores, class_labels, teacher_only, row_gate)
                targets = mixed_targets(class_labels, teacher, share)
            # Divided by the accumulated batch's token count exactly when Trainer.training_step does not divide by
            # the accumulation steps itself.
            accumulated = self.model_accepts_loss_kwargs or self.compute_loss_func is not None
            items = kwargs.get("num_items_in_batch") if accumulated else None
            loss = product_of_experts_token_loss(outputs.logits, labels, prior, classes, weight, items, targets)
            return (loss, outputs) if return_outputs else loss
        outputs = model(**inputs)
        targets = None
        if teacher is not None:
            share = self._teacher_share(lambda: outputs.logits, labels, teacher_only, row_gate)
            targets = mixed_targets(labels, teacher, share)
        if prior is None:
            loss = soft_cross_entropy(outputs.logits, targets)
        else:
            loss = SHALLOW_EXPERT_LOSSES[self.row_filter_args.row_filter_shallow_expert_loss](
                outputs.logits, labels, prior, weight, targets
            )
        return (loss, outputs) if return_outputs else loss

    def _teacher_share(
        self,
        class_scores: Callable[[], torch.Tensor],
        labels: torch.Tensor,
        teacher_only: Optional[torch.Tensor] = None,
        row_gate: Optional[torch.Tensor] = None,
    ) -> Union[float, torch.Tensor]:
        """`row_filter_teacher_mix`, scaled per row by `row_filter_teacher_mix_gate` when one is set, which reads
        the model's class scores `(batch, classes)` (computed only then) against each row's class `labels`, and by
        the fixed `row_gate` of `row_filter_teacher_row_gate`; 1 for the rows `teacher_only` marks (a contradicted
        row the teacher speaks for, `row_filter_contradicted`)."""
        mix, gate = self.row_filter_args.row_filter_teacher_mix, self.row_filter_args.row_filter_teacher_mix_gate
        share = mix
        if gate is not None:
            opened = TEACHER_MIX_GATES[gate](class_scores(), labels)
            if torch.is_grad_enabled():  # a training step: logged as the mean since the last training log
                self._teacher_gate_sum = self._teacher_gate_sum + opened.sum()  # a tensor: no device sync per step
                self._teacher_gate_rows += opened.numel()
            share = mix * opened
        if row_gate is not None:
            share = share * row_gate.to(device=labels.device, dtype=torch.float32)
        if teacher_only is None:
            return share
        only = teacher_only.to(device=labels.device, dtype=torch.float32)
        return only + (1.0 - only) * torch.as_tensor(share, dtype=torch.float32, device=labels.device)

    def _maybe_align_gradients(self, model: torch.nn.Module) -> None:
        if not self.ga_args.gradient_alignment or self._ga_last_step == self.state.global_step:
            return
        self._ga_last_step = self.state.global_step
        if not self._ga_engine_checked:
            _check_not_fsdp1(model)
            self._ga_engine_checked = True
        named = dict(self.accelerator.unwrap_model(model).named_parameters())
        params = [named[name] for name in self._ga_param_names]
        if self._ga_ref_grads is None or self.state.global_step % self.ga_args.ga_every_n_steps == 0:
            if self._ga_ref_grads is not None and self.ga_args.ga_subspace_size > 1:
                self._ga_ref_history = [self._ga_ref_grads, *self._ga_ref_history][: self.ga_args.ga_subspace_size - 1]
            self._ga_ref_grads, self._ga_ref_loss = self._reference_gradients(model, params)
        _, stats = align_gradients(
            [param.grad for param in params],
            self._ga_ref_grads,
            ref_loss=self._ga_ref_loss,
            epoch=float(self.state.epoch or 0.0),
            num_epochs=float(self.state.num_train_epochs or 1.0),
            ga_warmup_epochs=self.ga_args.ga_warmup_epochs,
            max_raw_grad_ratio=self.ga_args.max_raw_grad_ratio,
            min_ref_loss=self.ga_args.min_ref_loss,
            min_ref_grad_norm=self.ga_args.min_ref_grad_norm,
            inplace=True,
            ref_history=self._ga_ref_history or None,
            fallback=self.ga_args.ga_fallback,
        )
        self._record_alignment(stats)

    # ---- reference gradient ----

    def _reference_batch_source(self) -> Any:
        """The reference set with unused columns removed the way `get_train_dataloader` does, and its collator."""
        if self._ga_reference_source is None:
            import datasets

            dataset, collator = self.reference_dataset, self.data_collator
            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="reference")
            else:
                collator = self._get_collator_with_removed_columns(collator, description="reference")
            self._ga_reference_source = (dataset, collator)
        return self._ga_reference_source

    def compute_reference_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Loss of one reference micro-batch: `self.compute_loss` under the training autocast context.

        TRL trainers record per-batch metrics (token accuracy, entropy, token counts) inside `compute_loss`; the
        reference batch must not show up in them, so those attributes are restored afterwards. Override to use a
        different reference objective.
        """
        saved = {
            name: copy.deepcopy(getattr(self, name))
            for name in ("_metrics", "_total_train_tokens")
            if hasattr(self, name)
        }
        try:
            with self.compute_loss_context_manager(), self.accelerator.autocast():
                loss = self.compute_loss(model, inputs)
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
        return loss.mean() if loss.dim() else loss

    def _reference_gradients(
        self, model: torch.nn.Module, params: list[torch.nn.Parameter]
    ) -> tuple[list[torch.Tensor], float]:
        dataset, collator = self._reference_batch_source()
        per_device = self.ga_args.reference_batch_size or (
            self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        )
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        indices = self._ga_sampler.take(per_device * world)[rank * per_device : (rank + 1) * per_device]
        if any(_is_dtensor(param) for param in params):
            return self._sharded_reference_gradients(model, params, dataset, collator, indices)
        # The forward runs on the module inside any DDP wrapper, so DDP's reducer never sees this graph; the
        # reference gradients are averaged across ranks explicitly below.
        forward_model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        forward_model.train()
        mode = contextlib.nullcontext() if self.ga_args.reference_dropout else _dropout_disabled(forward_model)
        ref_grads: Optional[list[torch.Tensor]] = None
        total_loss = torch.zeros((), device=self.args.device)
        with mode:
            for loss, weight in self._reference_chunk_losses(forward_model, dataset, collator, indices):
                grads = torch.autograd.grad(loss * weight, params, allow_unused=True)
                total_loss += loss.detach().float() * weight
                if ref_grads is None:
                    ref_grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
                else:
                    for buffer, g in zip(ref_grads, grads):
                        if g is not None:
                            buffer.add_(g)
        if world > 1:
            ref_grads = self.accelerator.reduce(ref_grads, reduction="mean")
            total_loss = self.accelerator.reduce(total_loss, reduction="mean")
        return ref_grads, float(total_loss)

    def _reference_chunk_losses(
        self, model: torch.nn.Module, dataset: Any, collator: Any, indices: list[int]
    ) -> Iterator[tuple[torch.Tensor, float]]:
        """`(loss, weight)` per chunk of the reference rows `indices`: chunks of the training batch size (the memory a
        training micro-batch needs), weights summing to 1 so the weighted losses make the mean over all rows."""
        chunk = self.args.per_device_train_batch_size
        for start in range(0, len(indices), chunk):
            rows = indices[start : start + chunk]
            inputs = self._prepare_inputs(collator([dataset[i] for i in rows]))
            yield self.compute_reference_loss(model, inputs), len(rows) / len(indices)

    def _sharded_reference_gradients(
        self, model: torch.nn.Module, params: list[torch.nn.Parameter], dataset: Any, collator: Any, indices: list[int]
    ) -> tuple[list[torch.Tensor], float]:
        """The reference gradient under FSDP2: a real backward into `.grad`, with the training gradient set aside.

        `torch.autograd.grad` cannot be used here: FSDP2 runs the forward on unsharded parameters all-gathered from
        the sharded DTensors, so the sharded parameters are not in the graph (their gradients come back None). A
        backward lets FSDP2's own hooks reduce-scatter the reference gradient, which leaves on each rank its shard
        of the mean over ranks (what DDP's all-reduce gives, sharded). Only local shards are stashed and restored.
        """
        trainable = [param for param in model.parameters() if param.requires_grad]
        stash = [param.grad for param in trainable]
        mode = contextlib.nullcontext() if self.ga_args.reference_dropout else _dropout_disabled(model)
        total_loss = torch.zeros((), device=self.args.device)
        model.train()
        try:
            for param in trainable:
                param.grad = None
            with mode:
                for loss, weight in self._reference_chunk_losses(model, dataset, collator, indices):
                    # plain backward, not accelerator.backward: no gradient-accumulation division of the loss
                    (loss * weight).backward()
                    total_loss += loss.detach().float() * weight
            ref_grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]
        finally:
            for param, grad in zip(trainable, stash):
                param.grad = grad
        if self.accelerator.num_processes > 1:
            total_loss = self.accelerator.reduce(total_loss, reduction="mean")
        return ref_grads, float(total_loss)

    # ---- logging ----

    def _record_alignment(self, stats: AlignmentStats) -> None:
        log = self._ga_log
        for key, value in (
            ("ga/ref_loss", stats.ref_loss),
            ("ga/ref_grad_norm", stats.ref_grad_norm),
            ("ga/cosine", stats.cosine),
            ("ga/fallback_tensors", float(stats.fallback_tensors)),
        ):
            log[key] = log.get(key, 0.0) + value
        for branch in get_args(Branch):
            log[f"ga/branch_{branch}"] = log.get(f"ga/branch_{branch}", 0.0) + float(stats.branch == branch)
        self._ga_logged_steps += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """`Trainer.log`, adding to training logs (those with `loss`) the `ga/*` means since the last training log,
        the row filter's summary once, and `row_filter/teacher_gate`, the mean teacher-mix gate over the rows trained
        since the last training log (`row_filter_teacher_mix_gate`)."""
        if "loss" in logs and getattr(self, "_row_filter_log", None):
            logs.update(self._row_filter_log)  # once, with the first training log
            self._row_filter_log = {}
        if "loss" in logs and self._teacher_gate_rows > 0:
            logs["row_filter/teacher_gate"] = float(self._teacher_gate_sum) / self._teacher_gate_rows
            self._teacher_gate_sum, self._teacher_gate_rows = 0.0, 0
        if "loss" in logs and self._ga_logged_steps > 0:
            logs.update({key: value / self._ga_logged_steps for key, value in self._ga_log.items()})
            self._ga_log, self._ga_logged_steps = {}, 0
        super().log(logs, *args, **kwargs)

    # ---- resumable state ----

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # With weight averaging the checkpoint's model is the average (what checkpoint selection compared); the
        # trained weights, which a resumed run goes on from, are saved beside it.
        with self._weight_average_swapped_in():
            super()._save_checkpoint(model, trial)
        checkpoint_dir = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        if self.ga_args.gradient_alignment:
            self.save_gradient_alignment_state(checkpoint_dir)
        averaging = self._weight_averaging
        if averaging is not None and averaging.average is not None and self.args.should_save:
            averaging.average.save(os.path.join(checkpoint_dir, WEIGHT_AVERAGE_DIR))

    def save_gradient_alignment_state(self, checkpoint_dir: str) -> None:
        """Write the resumable GA state (reference order, cached reference gradients) into `checkpoint_dir`.

        The Trainer calls it from `_save_checkpoint`; a custom loop calls it beside its own model/optimizer save.
        The scalars go to `gradient_alignment/state.json` (main process). Unsharded reference gradients go to
        `ref_grads.safetensors` (main process); sharded ones (FSDP2 DTensors) are saved by every rank as a
        `torch.distributed.checkpoint` directory, each rank writing its own shard: under FSDP2 this is a collective
        and every rank must call it.
        """
        sharded = self._ga_ref_grads is not None and any(_is_dtensor(grad) for grad in self._ga_ref_grads)
        if not sharded and not self.args.should_save:
            return
        folder = os.path.join(checkpoint_dir, GA_STATE_DIR)
        os.makedirs(folder, exist_ok=True)
        if self.args.should_save:
            state = {
                "sampler": self._ga_sampler.state_dict(),
                "ref_loss": self._ga_ref_loss,
                "param_names": self._ga_param_names,
                "has_ref_grads": self._ga_ref_grads is not None,
                "ref_history_len": len(self._ga_ref_history),
                "ref_grads_format": "dcp" if sharded else "safetensors",
            }
            with open(os.path.join(folder, GA_STATE_NAME), "w") as file:
                json.dump(state, file, indent=2)
        if self._ga_ref_grads is None:
            return
        tensors = {}
        for age, grads in enumerate([self._ga_ref_grads, *self._ga_ref_history]):
            suffix = "" if age == 0 else f"@{age}"  # "@k": the reference gradient k refreshes ago
            for name, grad in zip(self._ga_param_names, grads):
                tensors[name + suffix] = grad.detach() if sharded else grad.detach().cpu().contiguous()
        if sharded:
            import torch.distributed.checkpoint as dcp

            dcp.save(tensors, checkpoint_id=os.path.join(folder, GA_REF_GRADS_DCP_DIR))
        else:
            save_file(tensors, os.path.join(folder, GA_REF_GRADS_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.ga_args.gradient_alignment:
            self.load_gradient_alignment_state(checkpoint)
        if checkpoint is not None and self._weight_averaging is not None:
            self._weight_averaging.resume(checkpoint)

    def load_gradient_alignment_state(self, checkpoint_dir: str) -> None:
        """Restore what [`save_gradient_alignment_state`] wrote, onto this trainer's (possibly sharded) parameters.

        Reference gradients saved sharded are loaded through `torch.distributed.checkpoint` into tensors laid out
        like the parameters now are (so a run may resume on another world size); saved unsharded, each rank cuts
        its own shard locally. Under FSDP2 every rank must call it, after `fully_shard`.
        """
        folder = os.path.join(checkpoint_dir, GA_STATE_DIR)
        path = os.path.join(folder, GA_STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(
                f"Resuming from {checkpoint_dir} without {GA_STATE_DIR}/{GA_STATE_NAME}: the reference-sample order "
                "restarts, so the run will not match an uninterrupted one.",
                stacklevel=2,
            )
            return
        with open(path) as file:
            state = json.load(file)
        if state["param_names"] != self._ga_param_names:
            raise ValueError(f"{path} was saved for other gradient-alignment parameters than this model's.")
        self._ga_sampler.load_state_dict(state["sampler"])
        if state["has_ref_grads"]:
            params = dict(self.accelerator.unwrap_model(self.model).named_parameters())
            suffixes = ["", *(f"@{age}" for age in range(1, state.get("ref_history_len", 0) + 1))]
            if state.get("ref_grads_format", "safetensors") == "dcp":
                import torch.distributed.checkpoint as dcp

                targets = {
                    name + suffix: torch.zeros_like(params[name].detach())
                    for suffix in suffixes
                    for name in self._ga_param_names
                }
                dcp.load(targets, checkpoint_id=os.path.join(folder, GA_REF_GRADS_DCP_DIR))
                restored = [[targets[name + suffix] for name in self._ga_param_names] for suffix in suffixes]
            else:
                saved = load_file(os.path.join(folder, GA_REF_GRADS_NAME))
                restored = [
                    [_like_parameter(saved[name + suffix], params[name]) for name in self._ga_param_names]
                    for suffix in suffixes
                ]
            self._ga_ref_grads, self._ga_ref_history = restored[0], restored[1:]
        self._ga_ref_loss = state["ref_loss"]


def _row_signal_columns(args: RowFilterArguments) -> list[str]:
    """The per-row columns the row filter adds to the kept rows for the loss to read."""
    return (
        [SHALLOW_PRIOR_COLUMN] * args.row_filter_shallow_expert
        + [TEACHER_COLUMN] * (args.row_filter_teacher_mix is not None)
        + [TEACHER_ONLY_COLUMN] * (args.row_filter_contradicted == "teacher")
        + [TEACHER_ROW_GATE_COLUMN] * (args.row_filter_teacher_row_gate is not None)
    )


def _with_teacher(kept: Any, report: dict[str, Any], indices: list[int], path: str) -> Any:
    """The trained rows (`indices`) with the trusted teacher's log-probabilities as the column [`TEACHER_COLUMN`]."""
    rows = report["rows"]
    if any("teacher_log_probs" not in row for row in rows):
        raise ValueError(
            f"`row_filter_teacher_mix` needs the trusted teacher's predictions, and {path} has none: it was made "
            "without row_filter_teacher_mix, or its kept rows trained on their labels alone "
            "(row_filter_plain_significance) and the teacher was not trained. Delete it to probe again."
        )
    return with_column(kept, TEACHER_COLUMN, [rows[index]["teacher_log_probs"] for index in indices])


def _with_teacher_row_gate(kept: Any, report: dict[str, Any], indices: list[int], path: str) -> Any:
    """The trained rows (`indices`) with their `row_filter_teacher_row_gate` as the column
    [`TEACHER_ROW_GATE_COLUMN`]."""
    rows = report["rows"]
    if any("teacher_row_gate" not in row for row in rows):
        raise ValueError(
            f"`row_filter_teacher_row_gate` needs each row's gate, and {path} has none: it was made without "
            "row_filter_teacher_row_gate. Delete it to probe again."
        )
    return with_column(kept, TEACHER_ROW_GATE_COLUMN, [rows[index]["teacher_row_gate"] for index in indices])


def _with_shallow_prior(
    kept: Any, report: dict[str, Any], indices: list[int], path: str, args: RowFilterArguments
) -> Any:
    """The trained rows (`indices`) with the shallow expert's log-probabilities
    ([`~row_filter.saved_expert_log_probs`]) as the column [`SHALLOW_PRIOR_COLUMN`]."""
    try:
        # The balanced expert's prior is its mean over every training row, not only the kept ones.
        expert = saved_expert_log_probs(report["rows"], args)
    except KeyError as missing:
        knobs = {"expert_gate": "row_filter_shallow_expert_gate", "residual_log_probs": "row_filter_residual_expert"}
        knob = knobs.get(missing.args[0], "row_filter_shallow_probe")
        raise ValueError(
            f"`row_filter_shallow_expert=True` needs the per-row {missing}, and {path} has none: it was made without "
            f"{knob}. Delete it to probe again."
        ) from None
    values = expert[torch.tensor(indices, dtype=torch.long)].tolist()
    return with_column(kept, SHALLOW_PRIOR_COLUMN, values)


def _row_filter_args(training_args: Any, row_filter_args: Optional[RowFilterArguments]) -> RowFilterArguments:
    if isinstance(training_args, RowFilterArguments):
        if row_filter_args is not None:
            raise ValueError(
                "`row_filter_args` must be None when `args` is already a RowFilterArguments "
                f"({type(training_args).__name__}); set the fields on `args` instead."
            )
        return training_args
    if row_filter_args is None:
        return RowFilterArguments()
    if not isinstance(row_filter_args, RowFilterArguments):
        raise TypeError(f"`row_filter_args` must be a RowFilterArguments, got {type(row_filter_args).__name__}.")
    return row_filter_args


def _like_parameter(tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """A saved full tensor on the parameter's device and dtype; for a DTensor parameter, this rank's shard of it."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank holds the full tensor, so each cuts its shard locally (no communication)
        full = tensor.to(device=param.to_local().device, dtype=param.dtype)
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    # clone: a fresh, aligned allocation; kernels on a mapped buffer may round the last bit differently
    return tensor.to(device=param.device, dtype=param.dtype).clone()


class MuScleLoraTrainer(GradientAlignmentMixin, Trainer):
    """`transformers.Trainer` with MuScleLoRA's gradient alignment; see [`GradientAlignmentMixin`].

    Example:

    >>> trainer = MuScleLoraTrainer(
    ...     model=model,
    ...     args=MuScleLoraTrainingArguments(output_dir="out", reference_split_size=96, ga_warmup_epochs=1,
    ...                                      max_raw_grad_ratio=0.1, min_ref_loss=0.4, num_train_epochs=10),
    ...     train_dataset=train, eval_dataset=dev, data_collator=collator, compute_metrics=compute_metrics,
    ... )  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    """
