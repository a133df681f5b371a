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
