"""bitsandbytes support.

PEFT's quantization back-ends already let one `Linear` adapter class run on top of `bnb.nn.Linear4bit` and
`bnb.nn.Linear8bitLt` (forward through the quantized kernel, merge by dequantize -> add -> requantize). What this
module adds is the MSLR-specific policy around them, with bitsandbytes imported only when it is installed.

Merging into a quantized weight is lossy: the merged weight is re-quantized, so `merge_and_unload()` on a 4-bit model
gives outputs that differ from the unmerged adapter by the quantization error of the new weight (the tests pin the
tolerance). For an exact model, merge into a full-precision copy of the base model instead.
"""

from __future__ import annotations

import importlib.util
import warnings

from torch import nn


def is_bnb_available() -> bool:
    """Whether bitsandbytes can be imported."""
    return importlib.util.find_spec("bitsandbytes") is not None


def bnb_linear_types() -> tuple[type[nn.Module], ...]:
    """The bitsandbytes linear layer classes MSLR can wrap; empty when bitsandbytes is not installed."""
    if not is_bnb_available():
        return ()
    import bitsandbytes as bnb

    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_bnb_quantized(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit or 8-bit linear layer."""
    types = bnb_linear_types()
    return bool(types) and isinstance(module, types)


def keep_4bit_weights_trainable(model: nn.Module) -> int:
    """Stop bitsandbytes repacking `model`'s 4-bit weights for its CPU inference kernel; the layers changed.

    On a CPU with AVX512-BF16, bitsandbytes (0.48 to 0.50 at least) repacks a `Linear4bit` weight the first time the
    layer runs in eval mode on an input that needs no gradient (any evaluation pass), and keeps it packed. The packed
    kernel passes no gradient to its input, so every adapter upstream of a packed layer stops training: measured
    here on SmolLM2-135M in NF4, after one evaluation pass none of its 120 LoRA tensors got a gradient again. A model
    that is evaluated and trained again (per-epoch evaluation, the row filter's scoring, the unlearning guard) must
    stay unpacked; weights already packed are unpacked. On GPU, and without bitsandbytes, nothing changes (0).

    Example:
        >>> from torch import nn
        >>> keep_4bit_weights_trainable(nn.Linear(2, 2))  # no 4-bit layer
        0
    """
    if not is_bnb_available():
        return 0
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
        quant_state = getattr(module.weight, "quant_state", None)
        if quant_state is not None and getattr(quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # the inverse bnb itself uses

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, quant_state
            )
    return changed


def warn_if_lossy_merge(base_layer: nn.Module) -> None:
    """Warn that merging into a quantized base layer re-quantizes the weight and so changes the outputs."""
    if is_bnb_quantized(base_layer):
        warnings.warn(
            f"Merging a MuScleLoRA adapter into a quantized {type(base_layer).__name__} re-quantizes the weight; "
            "outputs will differ from the unmerged model by the quantization error. Merge into a full-precision "
            "base model for an exact result.",
            UserWarning,
            stacklevel=3,
        )
