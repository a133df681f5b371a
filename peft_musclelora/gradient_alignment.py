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
from typing import Any, Literal, Optional, get_args

import torch

from ._checks import check_bool, check_int, check_number

try:  # torch built without distributed support has no DTensor; nothing can be sharded there
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - every wheel this project tests ships torch.distributed
    _DTensor = None

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

    >>> select_branch(ref_grad_norm=1e-3, ref_loss=0.2, epoch=2.0, num_epochs=5.0, ga_warmup_epochs=1.0,
    ...               max_raw_grad_ratio=0.1, min_ref_loss=0.4)
    ('mixed', 0.025)
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


def _is_dtensor(tensor: Optional[torch.Tensor]) -> bool:
    return _DTensor is not None and isinstance(tensor, _DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing into it writes into the DTensor), or the tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _sharded_mesh_dims(tensor: torch.Tensor, what: str) -> tuple[int, ...]:
    """Mesh dimensions over which a DTensor's local sums are partial sums (every placement but `Replicate`)."""
    dims = []
    for dim, placement in enumerate(tensor.placements):
        if placement.is_partial():
            raise ValueError(
                f"{what} is a DTensor with placements {tuple(tensor.placements)}: a `Partial` gradient has not been "
                "reduced across ranks yet; align after the synchronising backward (FSDP2 reduce-scatters into "
                "`Shard` gradients)."
            )
        if not placement.is_replicate():
            dims.append(dim)
    return tuple(dims)


def _reduction_groups(
    grads: Sequence[Optional[torch.Tensor]],
    ref_grads: Sequence[Optional[torch.Tensor]],
    ref_history: Optional[Sequence[Sequence[Optional[torch.Tensor]]]],
    present: list[int],
) -> tuple[list[Any], Optional[torch.device]]:
    """Process groups over which the local per-tensor sums are added ([] when nothing is sharded), and the device
    their collective needs (the mesh's: with CPU offload the shards live on the CPU while NCCL wants CUDA tensors).

    Every sum is taken over this rank's shard, so for DTensor gradients (FSDP2: `Shard(0)` on a 1-D mesh, or
    `(Replicate, Shard(0))` under HSDP) they must be all-reduced over the sharded mesh dimensions; one vector holds
    all of them, so that is one collective per sharded mesh dimension (one for FSDP2) whatever the number of tensors.
    This needs every gradient on the same mesh with the same sharded dimensions.
    """
    if not any(_is_dtensor(grads[i]) for i in present):
        for name, tensors in (("ref_grads", ref_grads), *(("ref_history", h) for h in ref_history or ())):
            for i in present:
                if _is_dtensor(tensors[i]):
                    raise ValueError(
                        f"Gradient {i} is a plain tensor but its entry in `{name}` is a DTensor; pass both sharded "
                        "(FSDP2) or both unsharded."
                    )
        return [], None
    first = grads[present[0]]
    mesh, dims = first.device_mesh, _sharded_mesh_dims(first, f"Gradient {present[0]}")
    for i in present:
        g = grads[i]
        if not _is_dtensor(g):
            raise ValueError(
                f"Gradient {i} is a plain tensor while gradient {present[0]} is a DTensor: under FSDP2 every aligned "
                "parameter must be sharded by `fully_shard` (apply it to the root module too)."
            )
        if g.device_mesh != mesh or _sharded_mesh_dims(g, f"Gradient {i}") != dims:
            raise ValueError(
                f"Gradient {i} is sharded as {tuple(g.placements)} on {g.device_mesh}, gradient {present[0]} as "
                f"{tuple(first.placements)} on {mesh}: gradient alignment needs one mesh and the same sharded mesh "
                "dimensions for every aligned parameter (one all-reduce for all of them)."
            )
        for name, tensors in (("ref_grads", ref_grads), *(("ref_history", h) for h in ref_history or ())):
            c = tensors[i]
            if c is not None and (
                not _is_dtensor(c) or c.device_mesh != g.device_mesh or tuple(c.placements) != tuple(g.placements)
            ):
                placements = tuple(c.placements) if _is_dtensor(c) else "a plain tensor"
                raise ValueError(
                    f"Gradient {i} is a DTensor with placements {tuple(g.placements)} but its entry in `{name}` is "
                    f"{placements}; reference gradients must be sharded like the training gradients."
                )
    return [mesh.get_group(dim) for dim in dims], torch.device(mesh.device_type)


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

    Sharded gradients (FSDP2): when the gradients are DTensors (`fully_shard` shards them on dim 0), every sum above
    (and the small Gram matrices of `ref_history`) is taken over this rank's shard, all of them are stacked into one
    vector and all-reduced once over the mesh, and the rescale is applied to the local shard; no full gradient is
    gathered, and the branch and statistics come out identical on every rank. It is then a collective: every rank
    must call it with the same tensors present. Reference gradients (and `ref_history`) must be sharded like `grads`.

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

    >>> g, g_c = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])
    >>> new, stats = align_gradients([g], [g_c])
    >>> new[0], stats.branch
    (tensor([3., 0.]), 'aligned')
    """
    if len(grads) != len(ref_grads):
        raise ValueError(f"`grads` and `ref_grads` must have the same length, got {len(grads)} and {len(ref_grads)}.")
    for age, earlier_grads in enumerate(ref_history or ()):
        if len(earlier_grads) != len(grads):
            raise ValueError(
                f"`ref_history[{age}]` must have the length of `grads` ({len(grads)}), got {len(earlier_grads)}."
            )
    _check_fallback("fallback", fallback)

    present = [i for i, g in enumerate(grads) if g is not None]
    groups, mesh_device = _reduction_groups(grads, ref_grads, ref_history, present)
    # One float64 vector of every per-tensor sum: [<g,c>, |g|^2, |c|^2] per tensor, then for tensors with earlier
    # reference gradients the Gram matrix of (c, earlier...) and its products with g. On sharded gradients these are
    # partial sums, so a single all-reduce of this vector makes them global.
    sums: list[torch.Tensor] = []
    earlier_of: dict[int, list[torch.Tensor]] = {}
    for i in present:
        g, c = grads[i], ref_grads[i]
        if c is None:
            c = torch.zeros_like(g)
        elif c.shape != g.shape:
            raise ValueError(f"Gradient {i} has shape {tuple(g.shape)} but its reference gradient {tuple(c.shape)}.")
        g_local, c_local = _local(g), _local(c)
        g32, c32 = _as_float(g_local).reshape(-1), _as_float(c_local).reshape(-1).to(g_local.device)
        sums.append(torch.stack([torch.dot(g32, c32), torch.dot(g32, g32), torch.dot(c32, c32)]).double())
        earlier = [h[i] for h in ref_history or () if h[i] is not None]
        if earlier:
            earlier_of[i] = earlier
            basis = _basis(g_local, c_local, earlier)
            sums.append((basis @ basis.T).reshape(-1))
            sums.append(basis @ g_local.reshape(-1).to(torch.float64))
    values: list[float] = []
    if sums:
        vector = torch.cat([s.to(sums[0].device) for s in sums])
        if groups:
            vector = vector.to(mesh_device)
        for group in groups:
            torch.distributed.all_reduce(vector, group=group)
        values = vector.cpu().tolist()
    dot_l, g_sq_l, c_sq_l, subspace = [], [], [], {}
    offset = 0
    for i in present:
        dot_l.append(values[offset])
        g_sq_l.append(values[offset + 1])
        c_sq_l.append(values[offset + 2])
        offset += 3
        if i in earlier_of:
            m = 1 + len(earlier_of[i])
            subspace[i] = (values[offset : offset + m * m], values[offset + m * m : offset + m * m + m])
            offset += m * m + m

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
            _local(out[i]).zero_()
    elif branch != "raw":
        for k, i in enumerate(present):
            g, c = _local(out[i]), ref_grads[i]
            usable = k in finite and c_sq_l[k] > 0 and math.isfinite(abs(dot_l[k]) / c_sq_l[k])
            if not usable:
                fallbacks += 1
                if fallback == "zero":
                    g.zero_()
                continue
            if i in earlier_of:
                gram, products = subspace[i]
                aligned = _subspace_projection(g, _local(c), earlier_of[i], gram, products, dot_l[k], c_sq_l[k])
            else:
                aligned = _local(c).to(device=g.device, dtype=g.dtype) * (abs(dot_l[k]) / c_sq_l[k])
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


def _basis(g: torch.Tensor, c: torch.Tensor, earlier: list[torch.Tensor]) -> torch.Tensor:
    """Rows `c, *earlier` (this rank's shards) flattened, in float64 on `g`'s device."""
    return torch.stack([t.reshape(-1).to(device=g.device, dtype=torch.float64) for t in (c, *map(_local, earlier))])


def _subspace_projection(
    g: torch.Tensor,
    c: torch.Tensor,
    earlier: list[torch.Tensor],
    gram: list[float],
    products: list[float],
    dot: float,
    c_sq: float,
) -> torch.Tensor:
    """Projection of `g` onto span(c, *earlier), its `c` component made non-negative (the 1-D rule's absolute value).

    `gram` (the Gram matrix of `c, *earlier`, row-major) and `products` (each of them dotted with `g`) are global
    sums, so the small solve in float64 is the same on every rank and only the final combination touches the
    (local) tensors. Zero or non-finite earlier gradients are left out (read off the Gram diagonal); directions with
    eigenvalue below 1e-10 of the largest are dropped, so nearly parallel earlier gradients do not amplify noise.
    """
    m = 1 + len(earlier)
    full = torch.tensor(gram, dtype=torch.float64).reshape(m, m)
    keep = [0] + [j for j in range(1, m) if math.isfinite(full[j, j].item()) and full[j, j].item() > 0]
    sub = full[keep][:, keep]
    values, vectors = torch.linalg.eigh(sub)
    kept = values > values.max() * 1e-10
    inverse = (vectors[:, kept] / values[kept]) @ vectors[:, kept].T
    coefficients = inverse @ torch.tensor(products, dtype=torch.float64)[keep]
    if dot < 0:  # <P g, c> = <g, c>: reflect the c component so the update descends the reference loss
        coefficients[0] -= 2.0 * dot / c_sq
    basis = _basis(g, c, [earlier[j - 1] for j in keep[1:]])
    return (basis.T @ coefficients.to(basis.device)).reshape(g.shape).to(g.dtype)


@dataclass
class GradientAlignmentArguments:
    """Knobs of gradient alignment, as typed dataclass fields (usable with `HfArgumentParser`).

    Mixed into [`MuScleLoraTrainingArguments`]; any `TrainingArguments` subclass can inherit it the same way (e.g.
    `class MyConfig(SFTConfig, GradientAlignmentArguments)`), or it can be passed on its own to a trainer built with
    [`GradientAlignmentMixin`] as `gradient_alignment_args=`.

    Published presets (MuScleLoRA, ACL 2024): BERT/RoBERTa-large `reference_split_size=96, ga_warmup_epochs=1,
    max_raw_grad_ratio=0.1, min_ref_loss=0.4`; Llama-2-7B `reference_split_size=128` with the other three at 0.

    Example:

    >>> args = GradientAlignmentArguments(reference_split_size=96, ga_warmup_epochs=1, max_raw_grad_ratio=0.1,
    ...                                   min_ref_loss=0.4)
    >>> args.ga_every_n_steps
    1
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
    reference_stratify: bool = field(
        default=False,
        metadata={
            "help": "Draw the reference_split_size rows stratified by label: each class gets its share of the split "
            "(at least one row when the size allows), so a small or imbalanced trusted set still covers every class. "
            "Needs one class label per row (classification). Default False: a seeded random split."
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
        check_bool("gradient_alignment", self.gradient_alignment)
        check_int("reference_split_size", self.reference_split_size, optional=True)
        check_bool("reference_stratify", self.reference_stratify)
        check_int("reference_batch_size", self.reference_batch_size, optional=True)
        check_number("max_raw_grad_ratio", self.max_raw_grad_ratio, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        check_number("ga_warmup_epochs", self.ga_warmup_epochs, ">= 0", lambda v: v >= 0.0)
        if num_train_epochs is not None and self.ga_warmup_epochs > num_train_epochs:
            raise ValueError(
                f"`ga_warmup_epochs` must not exceed `num_train_epochs` ({num_train_epochs!r}), "
                f"got {self.ga_warmup_epochs!r}."
            )
        check_number("min_ref_loss", self.min_ref_loss, ">= 0", lambda v: v >= 0.0)
        check_number("min_ref_grad_norm", self.min_ref_grad_norm, ">= 0", lambda v: v >= 0.0)
        _check_fallback("ga_fallback", self.ga_fallback)
        check_int("ga_subspace_size", self.ga_subspace_size)
        check_bool("reference_dropout", self.reference_dropout)
        check_int("ga_every_n_steps", self.ga_every_n_steps)
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
