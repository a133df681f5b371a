"""The exact check of a merge into a bitsandbytes-quantized layer, shared by test_bnb and test_llm.

bitsandbytes is imported inside the functions, so importing this module never needs it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from peft_musclelora import MuScleLoraLayer


def bnb_round_trip(weight: torch.Tensor, base_layer: torch.nn.Module) -> torch.Tensor:
    """`dequantize(quantize(weight))` with bitsandbytes' own functions and the base layer's quantization settings."""
    import bitsandbytes as bnb

    if isinstance(base_layer, bnb.nn.Linear4bit):
        state = base_layer.weight.quant_state
        packed, new_state = bnb.functional.quantize_4bit(
            weight.contiguous(),
            blocksize=state.blocksize,
            compress_statistics=base_layer.weight.compress_statistics,
            quant_type=state.quant_type,
            quant_storage=base_layer.weight.quant_storage,
        )
        return bnb.functional.dequantize_4bit(packed, new_state).float()
    codes, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    return bnb.functional.int8_vectorwise_dequant(codes, row_scales).float()


def assert_merge_is_the_bnb_round_trip(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], merge: Callable[[], object]
) -> None:
    """Merge with `merge()` and check, layer by layer, that nothing but bitsandbytes' re-quantization changed.

    1. Each merged quantized weight is exactly bitsandbytes' round trip of the merged weight `W0 + delta` (added in
       the quant state's dtype, as the merge does; same quantizer, same settings): the merge adds no error of its own.
    2. On the layer's real input `x`, `|merged(x) - unmerged(x)|` is at most the sum of what was measured: the
       re-quantization error `|x| @ |Q(W0 + delta) - (W0 + delta)|^T` (against the float32 sum), the quantized
       kernels' own error before and after (base forward vs `x @ W^T`, measured on this CPU) and the adapter branch's
       float rounding. The bound is the triangle inequality over measured terms, so it holds on any CPU (a fixed
       ratio of the adapter's effect held on one CPU and not on another).
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MuScleLoraLayer)}
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        layer.register_forward_hook(lambda _m, args, out, name=name: captured.__setitem__(name, (args[0], out)))
        for name, layer in layers.items()
    ]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    before = {}
    with torch.no_grad():
        for name, layer in layers.items():
            base = layer.get_base_layer()
            x, unmerged = captured[name]
            native = layer.get_base_weight()  # in the quant state's dtype, where the merge adds the delta
            delta = layer.get_delta_weight("default")
            w0 = native.float()
            target = w0 + delta.float()
            kernel_before = (base(x).float() - x.float() @ w0.T).abs()
            branch_error = (unmerged.float() - base(x).float() - x.float() @ delta.float().T).abs()
            expected = bnb_round_trip(native + delta.to(native), base)
            before[name] = (base, x, unmerged.float(), target, expected, kernel_before + branch_error)
    with pytest.warns(UserWarning, match="re-quantizes the weight"):
        merge()
    with torch.no_grad():
        for name, (base, x, unmerged, target, expected, measured) in before.items():
            merged_weight = layers[name].get_base_weight().float()
            assert torch.equal(merged_weight, expected), name
            requant = x.float().abs() @ (merged_weight - target).abs().T
            assert requant.max() > 0, name  # the weight really was re-quantized
            merged = base(x).float()
            kernel_after = (merged - x.float() @ merged_weight.T).abs()
            bound = requant + measured + kernel_after
            slack = 1e-5 * (x.float().abs() @ target.abs().T) + 1e-6  # float32 summation order
            assert ((merged - unmerged).abs() <= bound + slack).all(), name
