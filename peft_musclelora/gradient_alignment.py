"""Gradient alignment (GA): project each training-gradient tensor onto the gradient of trusted clean reference samples.

MuScleLoRA's second ingredient. After the training batch's backward pass, one batch of clean reference samples is
differentiated, and per parameter tensor the training gradient `g` is replaced by its (absolute) projection onto the
reference gradient `g_c`:

    g_a = |<g, g_c>| / ||g_c||^2 * g_c

so the update only moves along the clean direction, at the length the training batch asked for. The functions here are
pure tensor code with no dependency on a trainer; [`GradientAlignmentMixin`] wires them into `transformers.Trainer`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

import torch

Branch = Literal["aligned", "mixed", "raw", "zero"]
Fallback = Literal["raw", "zero"]
FALLBACKS: tuple[str, ...] = get_args(Fallback)


@dataclass(frozen=True)
class AlignmentStats:
    """What [`align_gradients`] did on one step.

    Attributes:
        branch: `"aligned"` (every tensor replaced by `g_a`), `"mixed"` (`(1 - mu) g_a + mu g`), `"raw"` (`g`) or
            `"zero"` (the raw branch under `fallback="zero"`: every gradient set to zero).
        mu: Weight of the raw gradient in the mixed branch; 0 for `"aligned"` and `"zero"`, 1 for `"raw"`.
        ref_grad_norm: Mean over tensors of `||g_c||`, zero-norm and non-finite tensors excluded (the gate value).
        ref_loss: The reference loss passed in (`nan` when none was given).
        cosine: Cosine between `g` and `g_c` over all tensors with finite gradients, 0 when either is zero.
        fallback_tensors: Tensors whose `g_c` (or `g`) was zero or non-finite (aligned/mixed only); they kept `g`
            under `fallback="raw"` and were set to zero under `fallback="zero"`.
        num_tensors: Tensors that had a training gradient.
    """

    branch: Branch
    mu: float
    ref_grad_norm: float
    ref_loss: float
    cosine: float
    fallback_tensors: int
    num_tensors: int


def select_branch(
    *,
    ref_grad_norm: float,
    ref_loss: float,
    epoch: float,
    num_epochs: float,
    ga_warmup_epochs: float = 0.0,
    max_raw_grad_ratio: float = 0.0,
    min_ref_loss: float = 0.0,
    min_ref_grad_norm: float = 5e-7,
) -> tuple[Branch, float]:
    """Choose the update of one step, in the order of the method's reference implementation.

    1. `ref_grad_norm > min_ref_grad_norm` and `ref_loss > min_ref_loss`: aligned (even during warm-up).
    2. else `max_raw_grad_ratio > 0` and `epoch >= ga_warmup_epochs`: mixed, with
       `mu = max_raw_grad_ratio * (epoch - ga_warmup_epochs) / (num_epochs - ga_warmup_epochs)`.
    3. else: raw ([`align_gradients`] turns it into `"zero"` under `fallback="zero"`).

    Returns:
        The branch and `mu`, the weight of the raw gradient (0 aligned, 1 raw).

    Example:

    ```py
    >>> select_branch(ref_grad_norm=1e-3, ref_loss=0.2, epoch=2.0, num_epochs=5.0, ga_warmup_epochs=1.0,
    ...               max_raw_grad_ratio=0.1, min_ref_loss=0.4)
    ('mixed', 0.025)
    ```
    """
    if ref_grad_norm > min_ref_grad_norm and ref_loss > min_ref_loss:
        return "aligned", 0.0
    if max_raw_grad_ratio > 0 and epoch >= ga_warmup_epochs:
        span = num_epochs - ga_warmup_epochs
        fraction = (epoch - ga_warmup_epochs) / span if span > 0 else 1.0
        return "mixed", max_raw_grad_ratio * min(max(fraction, 0.0), 1.0)
    return "raw", 1.0


def _check_fallback(name: str, value: object) -> None:
    if value not in FALLBACKS:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, FALLBACKS))}, got {value!r}.")


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


@torch.no_grad()
def align_gradients(
    grads: Sequence[Optional[torch.Tensor]],
    ref_grads: Sequence[Optional[torch.Tensor]],
    *,
    ref_loss: float = math.inf,
    epoch: float = 0.0,
    num_epochs: float = 1.0,
    ga_warmup_epochs: float = 0.0,
    max_raw_grad_ratio: float = 0.0,
    min_ref_loss: float = 0.0,
    min_ref_grad_norm: float = 5e-7,
    inplace: bool = False,
    ref_history: Optional[Sequence[Sequence[Optional[torch.Tensor]]]] = None,
    fallback: Fallback = "raw",
) -> tuple[list[Optional[torch.Tensor]], AlignmentStats]:
    """Align training gradients with reference gradients, tensor by tensor.

    Works parameter-wise: per tensor it needs `<g, g_c>`, `||g||^2` and `||g_c||^2` (all reduced to one host sync),
    then one fused `g_a = c * g_c` (or `(1 - mu) c g_c + mu g`); the full-model gradient is never concatenated.
    A tensor whose `g_c` is zero or non-finite (or whose `g` is non-finite) keeps `g` and is counted in
    `stats.fallback_tensors`; nothing here turns finite input into NaN. With `fallback="zero"` whatever would keep
    the untrusted `g` gets a zero gradient instead: the raw branch (reported as `"zero"`) and those tensors. A `None`
    training gradient stays `None`; a `None` reference gradient counts as zero. The branch is chosen by
    [`select_branch`].

    Args:
        grads: Training gradients `g`, one per parameter tensor (`None` for tensors without gradient).
        ref_grads: Reference gradients `g_c`, same length and shapes.
        ref_loss: Loss of the reference batch (gates the aligned branch against `min_ref_loss`).
        epoch: Training progress in epochs at this step (fractional).
        num_epochs: Total epochs of the run (for the mixing weight).
        ga_warmup_epochs, max_raw_grad_ratio, min_ref_loss, min_ref_grad_norm: See [`GradientAlignmentArguments`].
        inplace: Write the result into `grads` instead of allocating new tensors.
        ref_history: Earlier reference gradients (each the same structure as `ref_grads`). When given, `g_a` is the
            orthogonal projection of `g` onto the span of `g_c` and the earlier ones (per tensor), with its `g_c`
            component reflected to the positive side when `<g, g_c> < 0`; with no history this is exactly the
            formula above. Zero or non-finite earlier gradients are left out of the span.
        fallback: What a step (or tensor) without a usable reference signal gets: `"raw"` keeps the training
            gradient (the reference implementation), `"zero"` sets it to zero (fail-closed: nothing moves in a
            direction the trusted rows did not produce).

    Returns:
        The new gradients and an [`AlignmentStats`].

    Example:

    ```py
    >>> g, g_c = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])
    >>> new, stats = align_gradients([g], [g_c])
    >>> new[0], stats.branch
    (tensor([3., 0.]), 'aligned')
    ```
    """
    if len(grads) != len(ref_grads):
        raise ValueError(f"`grads` and `ref_grads` must have the same length, got {len(grads)} and {len(ref_grads)}.")
    _check_fallback("fallback", fallback)

    present = [i for i, g in enumerate(grads) if g is not None]
    dots, g_sq, c_sq = [], [], []
    for i in present:
        g, c = grads[i], ref_grads[i]
        if c is None:
            c = torch.zeros_like(g)
        elif c.shape != g.shape:
            raise ValueError(f"Gradient {i} has shape {tuple(g.shape)} but its reference gradient {tuple(c.shape)}.")
        g32, c32 = _as_float(g).reshape(-1), _as_float(c).reshape(-1).to(g.device)
        dots.append(torch.dot(g32, c32))
        g_sq.append(torch.dot(g32, g32))
        c_sq.append(torch.dot(c32, c32))
    if present:
        dot_l, g_sq_l, c_sq_l = torch.stack([torch.stack(dots), torch.stack(g_sq), torch.stack(c_sq)]).cpu().tolist()
    else:
        dot_l, g_sq_l, c_sq_l = [], [], []

    ref_norms = [math.sqrt(c) for c in c_sq_l if math.isfinite(c) and c > 0]
    mean_ref_norm = sum(ref_norms) / len(ref_norms) if ref_norms else 0.0
    finite = [k for k in range(len(present)) if all(math.isfinite(v) for v in (dot_l[k], g_sq_l[k], c_sq_l[k]))]
    denominator = math.sqrt(sum(g_sq_l[k] for k in finite)) * math.sqrt(sum(c_sq_l[k] for k in finite))
    cosine = sum(dot_l[k] for k in finite) / denominator if denominator > 0 else 0.0

    branch, mu = select_branch(
        ref_grad_norm=mean_ref_norm,
        ref_loss=ref_loss,
        epoch=epoch,
        num_epochs=num_epochs,
        ga_warmup_epochs=ga_warmup_epochs,
        max_raw_grad_ratio=max_raw_grad_ratio,
        min_ref_loss=min_ref_loss,
        min_ref_grad_norm=min_ref_grad_norm,
    )
    if branch == "raw" and fallback == "zero":
        branch, mu = "zero", 0.0

    out: list[Optional[torch.Tensor]] = list(grads) if inplace else [None if g is None else g.clone() for g in grads]
    fallbacks = 0
    if branch == "zero":
        for i in present:
            out[i].zero_()
    elif branch != "raw":
        for k, i in enumerate(present):
            g, c = out[i], ref_grads[i]
            usable = k in finite and c_sq_l[k] > 0 and math.isfinite(abs(dot_l[k]) / c_sq_l[k])
            if not usable:
                fallbacks += 1
                if fallback == "zero":
                    g.zero_()
                continue
            earlier = [h[i] for h in ref_history or () if h[i] is not None]
            if earlier:
                aligned = _subspace_projection(g, c, earlier, dot_l[k], c_sq_l[k])
            else:
                aligned = c.to(device=g.device, dtype=g.dtype) * (abs(dot_l[k]) / c_sq_l[k])
            if branch == "aligned":
                g.copy_(aligned)
            else:
                g.mul_(mu).add_(aligned, alpha=1.0 - mu)

    stats = AlignmentStats(
        branch=branch,
        mu=mu,
        ref_grad_norm=mean_ref_norm,
        ref_loss=float(ref_loss),
        cosine=cosine,
        fallback_tensors=fallbacks,
        num_tensors=len(present),
    )
    return out, stats


def _subspace_projection(
    g: torch.Tensor, c: torch.Tensor, earlier: list[torch.Tensor], dot: float, c_sq: float
) -> torch.Tensor:
    """Projection of `g` onto span(c, *earlier), its `c` component made non-negative (the 1-D rule's absolute value).

    Solved through the small Gram matrix in float64; directions with eigenvalue below 1e-10 of the largest are
    dropped, so nearly parallel earlier gradients do not amplify noise.
    """
    flat = [c.reshape(-1).to(device=g.device, dtype=torch.float64)]
    for e in earlier:
        e64 = e.reshape(-1).to(device=g.device, dtype=torch.float64)
        if bool(torch.isfinite(e64).all()) and bool(e64.any()):
            flat.append(e64)
    basis = torch.stack(flat)
    gram = basis @ basis.T
    values, vectors = torch.linalg.eigh(gram)
    keep = values > values.max() * 1e-10
    inverse = (vectors[:, keep] / values[keep]) @ vectors[:, keep].T
    projection = basis.T @ (inverse @ (basis @ g.reshape(-1).to(torch.float64)))
    if dot < 0:  # <P g, c> = <g, c>: reflect the c component so the update descends the reference loss
        projection -= (2.0 * dot / c_sq) * flat[0]
    return projection.reshape(g.shape).to(g.dtype)


def _check_number(name: str, value: object, *, low: float, high: float = math.inf, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a finite number ({allowed}), got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _check_optional_positive_int(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be None or an integer >= 1, got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be None or an integer >= 1, got {value!r}.")


@dataclass
class GradientAlignmentArguments:
    """Knobs of gradient alignment, as typed dataclass fields (usable with `HfArgumentParser`).

    Mixed into [`MuScleLoraTrainingArguments`]; any `TrainingArguments` subclass can inherit it the same way (e.g.
    `class MyConfig(SFTConfig, GradientAlignmentArguments)`), or it can be passed on its own to a trainer built with
    [`GradientAlignmentMixin`] as `gradient_alignment_args=`.

    Published presets (MuScleLoRA, ACL 2024): BERT/RoBERTa-large `reference_split_size=96, ga_warmup_epochs=1,
    max_raw_grad_ratio=0.1, min_ref_loss=0.4`; Llama-2-7B `reference_split_size=128` with the other three at 0.

    Example:

    ```py
    >>> args = GradientAlignmentArguments(reference_split_size=96, ga_warmup_epochs=1, max_raw_grad_ratio=0.1,
    ...                                   min_ref_loss=0.4)
    >>> args.ga_every_n_steps
    1
    ```
    """

    gradient_alignment: bool = field(
        default=True,
        metadata={
            "help": "Replace each training-gradient tensor by its projection onto the clean reference gradient."
        },
    )
    reference_split_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Take this many seeded random rows out of eval_dataset as the trusted clean reference set "
            "(they are removed from eval). Alternative to passing reference_dataset= to the trainer."
        },
    )
    reference_batch_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Reference samples per device per refresh. Default: per_device_train_batch_size * "
            "gradient_accumulation_steps (the same number of samples as one optimisation step). Processed in chunks "
            "of per_device_train_batch_size."
        },
    )
    ga_warmup_epochs: float = field(
        default=0.0,
        metadata={
            "help": "Epochs before the mixed branch may be used (the aligned branch is used whenever gated on)."
        },
    )
    max_raw_grad_ratio: float = field(
        default=0.0,
        metadata={
            "help": "In [0, 1]. When the aligned branch is gated off after warm-up, use (1 - mu) g_a + mu g with mu "
            "rising linearly from 0 to this value over the remaining epochs. 0 disables the mixed branch."
        },
    )
    min_ref_loss: float = field(
        default=0.0,
        metadata={"help": "The aligned branch needs a reference loss above this value (>= 0)."},
    )
    min_ref_grad_norm: float = field(
        default=5e-7,
        metadata={"help": "The aligned branch needs the mean reference-gradient norm above this value (>= 0)."},
    )
    ga_every_n_steps: int = field(
        default=1,
        metadata={"help": "Recompute the reference gradient every n optimisation steps and reuse it in between."},
    )
    reference_seed: Optional[int] = field(
        default=None,
        metadata={"help": "Seed of the reference split and of the reference-sample order. Default: the run's seed."},
    )
    ga_subspace_size: int = field(
        default=1,
        metadata={
            "help": "Project g onto the span of the current and the n-1 previous reference gradients (per tensor) "
            "instead of onto the current one alone. 1 is the published projection. A research knob: more of the "
            "training gradient passes, still only inside directions the trusted data produced."
        },
    )
    reference_dropout: bool = field(
        default=False,
        metadata={
            "help": "Keep dropout active in the reference pass, as the reference implementation did. Default False: "
            "the reference gradient is taken without dropout (a less noisy estimate of the clean direction, and a "
            "cheaper pass); gradient checkpointing stays on either way."
        },
    )
    ga_params: Optional[str] = field(
        default=None,
        metadata={
            "help": "Regex (re.search on parameter names): align only matching trainable parameters; the others keep "
            "their raw gradient. A research knob; default aligns every trainable parameter."
        },
    )
    ga_fallback: str = field(
        default="raw",
        metadata={
            "help": "What a step gets when the aligned branch is gated off and the mixed branch does not apply (and "
            "what a tensor gets whose reference gradient is zero or non-finite): 'raw' keeps the training gradient, "
            "as the reference implementation did; 'zero' sets it to zero (fail-closed: once the references are "
            "fitted and their gradient vanishes, the untrusted gradient is not let through)."
        },
    )

    def __post_init__(self) -> None:
        self.validate_gradient_alignment_args()

    def validate_gradient_alignment_args(self, num_train_epochs: Optional[float] = None) -> None:
        """Check every gradient-alignment field; raises `TypeError`/`ValueError` naming the field and value.

        Args:
            num_train_epochs: When given (and training is epoch-bounded), `ga_warmup_epochs` must not exceed it.
        """
        if not isinstance(self.gradient_alignment, bool):
            raise TypeError(f"`gradient_alignment` must be True or False, got {self.gradient_alignment!r}.")
        _check_optional_positive_int("reference_split_size", self.reference_split_size)
        _check_optional_positive_int("reference_batch_size", self.reference_batch_size)
        _check_number("max_raw_grad_ratio", self.max_raw_grad_ratio, low=0.0, high=1.0, allowed="in [0, 1]")
        _check_number("ga_warmup_epochs", self.ga_warmup_epochs, low=0.0, allowed=">= 0")
        if num_train_epochs is not None and self.ga_warmup_epochs > num_train_epochs:
            raise ValueError(
                f"`ga_warmup_epochs` must not exceed `num_train_epochs` ({num_train_epochs!r}), "
                f"got {self.ga_warmup_epochs!r}."
            )
        _check_number("min_ref_loss", self.min_ref_loss, low=0.0, allowed=">= 0")
        _check_number("min_ref_grad_norm", self.min_ref_grad_norm, low=0.0, allowed=">= 0")
        _check_fallback("ga_fallback", self.ga_fallback)
        if isinstance(self.ga_subspace_size, bool) or not isinstance(self.ga_subspace_size, int):
            raise TypeError(f"`ga_subspace_size` must be an integer >= 1, got {self.ga_subspace_size!r}.")
        if self.ga_subspace_size < 1:
            raise ValueError(f"`ga_subspace_size` must be an integer >= 1, got {self.ga_subspace_size!r}.")
        if not isinstance(self.reference_dropout, bool):
            raise TypeError(f"`reference_dropout` must be True or False, got {self.reference_dropout!r}.")
        if isinstance(self.ga_every_n_steps, bool) or not isinstance(self.ga_every_n_steps, int):
            raise TypeError(f"`ga_every_n_steps` must be an integer >= 1, got {self.ga_every_n_steps!r}.")
        if self.ga_every_n_steps < 1:
            raise ValueError(f"`ga_every_n_steps` must be an integer >= 1, got {self.ga_every_n_steps!r}.")
        if self.reference_seed is not None and (
            isinstance(self.reference_seed, bool) or not isinstance(self.reference_seed, int)
        ):
            raise TypeError(f"`reference_seed` must be None or an integer, got {self.reference_seed!r}.")
        if self.ga_params is not None:
            if not isinstance(self.ga_params, str):
                raise TypeError(f"`ga_params` must be None or a regex string, got {self.ga_params!r}.")
            try:
                re.compile(self.ga_params)
            except re.error as error:
                raise ValueError(f"`ga_params` must be a valid regex, got {self.ga_params!r}: {error}.") from error
