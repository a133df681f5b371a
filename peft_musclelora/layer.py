"""The multi-scale low-rank (MSLR) layer.

For a frozen base map `y = W0 x + b0`, scales `k_1..k_B` and per-scale rank `r`, the adapter adds

    (alpha / r) * sum_j B_j A_j (k_j * x)

The factors are stored stacked: `A` is (B*r, in), `B` is (out, B*r) and a buffer holds every scale repeated `r` times.
Because `A_j (k_j x) = k_j (A_j x)`, multiplying the stacked `A x` by that buffer gives every branch its scaled input,
so a forward is two matmuls and an elementwise product, whatever the number of scales.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import quantization_extra_repr, resolve_quantization_backend
from peft.utils.other import transpose
from torch import nn

from .bnb import warn_if_lossy_merge


class MuScleLoraLayer(BaseTunerLayer):
    """Per-adapter state shared by every MSLR layer type: factors, scales, scaling and dropout."""

    adapter_layer_names = ("musclelora_A", "musclelora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "musclelora_dropout", "musclelora_scales")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.musclelora_dropout = nn.ModuleDict({})
        self.musclelora_A = nn.ModuleDict({})
        self.musclelora_B = nn.ModuleDict({})
        # The scales come from the config, so they are rebuilt on load rather than saved with the weights.
        self.musclelora_scales = BufferDict({}, persistent=False)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"Unsupported base layer type {type(self.get_base_layer()).__name__}.")
        self.in_features = in_features
        self.out_features = out_features
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        scales: Sequence[float],
        lora_dropout: float = 0.0,
        init_weights: Union[bool, str] = True,
        inference_mode: bool = False,
    ) -> None:
        """Create (or replace) the adapter `adapter_name` on this layer."""
        if r < 1:
            raise ValueError(f"`r` must be an integer >= 1, got {r!r}.")
        if not scales:
            raise ValueError(f"`scales` must hold at least one scale, got {scales!r}.")
        total_rank = len(scales) * r
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.musclelora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.musclelora_A[adapter_name] = nn.Linear(self.in_features, total_rank, bias=False)
        self.musclelora_B[adapter_name] = nn.Linear(total_rank, self.out_features, bias=False)
        self.musclelora_scales[adapter_name] = torch.tensor(scales, dtype=torch.float32).repeat_interleave(r)
        self.reset_musclelora_parameters(adapter_name, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_musclelora_parameters(self, adapter_name: str, init_weights: Union[bool, str]) -> None:
        """Initialise the factors of `adapter_name` as `init_weights` asks (see [`MuScleLoraConfig`])."""
        if init_weights is False:
            return
        lora_A = self.musclelora_A[adapter_name].weight
        lora_B = self.musclelora_B[adapter_name].weight
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        if init_weights is True:
            nn.init.zeros_(lora_B)
        elif init_weights == "kaiming":
            nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
        else:
            raise ValueError(f"`init_weights` must be True, False or 'kaiming', got {init_weights!r}.")

    def scales(self, adapter_name: str) -> list[float]:
        """The distinct scales of `adapter_name`, in order."""
        return self.musclelora_scales[adapter_name][:: self.r[adapter_name]].tolist()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`scaling * B @ diag(k) @ A`, the change of the base weight that merging `adapter_name` makes."""
        lora_A = self.musclelora_A[adapter_name].weight
        lora_B = self.musclelora_B[adapter_name].weight
        scales = self.musclelora_scales[adapter_name]
        dtype = lora_B.dtype
        # Half-precision matmuls are slow and lossy on CPU; merge in float32 and cast back.
        if lora_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            lora_A, lora_B = lora_A.float(), lora_B.float()
        delta = (lora_B @ (lora_A * scales.to(lora_A)[:, None])) * self.scaling[adapter_name]
        return transpose(delta, self.fan_in_fan_out).to(dtype)


class Linear(nn.Module, MuScleLoraLayer):
    """MSLR adapter around an `nn.Linear`, GPT-2 `Conv1D` or bitsandbytes linear layer."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        scales: Sequence[float] = (1.0,),
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        init_weights: Union[bool, str] = True,
        is_target_conv_1d_layer: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        MuScleLoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, scales, lora_dropout=lora_dropout, init_weights=init_weights)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active adapters' weights into the base weight.

        Args:
            safe_merge: Merge into a copy first and refuse if it holds NaN or inf.
            adapter_names: Adapters to merge; the active ones when None.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        warn_if_lossy_merge(self.get_base_layer())
        for adapter_name in adapter_names:
            if adapter_name not in self.musclelora_A:
                continue
            weight = self.get_base_weight()
            delta = self.get_delta_weight(adapter_name).to(weight)
            if safe_merge:
                weight = weight.clone() + delta
                if not torch.isfinite(weight).all():
                    raise ValueError(f"NaNs detected in the merged weights; adapter {adapter_name!r} seems broken.")
            else:
                weight += delta
            self.set_base_weight(weight)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            if adapter_name in self.musclelora_A:
                weight = self.get_base_weight()
                weight -= self.get_delta_weight(adapter_name).to(weight)
                self.set_base_weight(weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter_name in self.active_adapters:
            if adapter_name not in self.musclelora_A:
                continue
            lora_A = self.musclelora_A[adapter_name]
            lora_B = self.musclelora_B[adapter_name]
            k = self.musclelora_scales[adapter_name].to(lora_A.weight.dtype)
            dropout = self.musclelora_dropout[adapter_name]
            x_in = self._cast_input_dtype(dropout(x), lora_A.weight.dtype)
            # W0 x + scale * B(A(k * x)), with A(k * x) computed as k * A(x) for all branches at once.
            result = result + lora_B(k * lora_A(x_in)) * self.scaling[adapter_name]
        return result.to(previous_dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "musclelora." + super().__repr__()

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)

