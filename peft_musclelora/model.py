"""`MuScleLoraModel`: finds the target modules of a model and wraps them in MSLR layers."""

from __future__ import annotations

import re
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import MuScleLoraConfig
from .layer import Linear, MuScleLoraLayer


def _pattern_matches(pattern: str, module_name: str) -> bool:
    # Same rule as peft's `get_pattern_key`: the pattern must match a dotted suffix of the module name.
    return re.match(rf"(.*\.)?({pattern})$", module_name) is not None


def _first_matching_pattern(patterns: dict[str, Any], module_name: str) -> Optional[str]:
    return next((pattern for pattern in patterns if _pattern_matches(pattern, module_name)), None)


def _is_supported_base_layer(layer: nn.Module) -> bool:
    if isinstance(layer, (nn.Linear, Conv1D)):
        return True
    backend = resolve_quantization_backend(layer)
    return backend is not None and backend.layer_type == "linear"


class MuScleLoraModel(BaseTuner):
    """Creates a MuScleLoRA model from a pretrained transformers model.

    Use it through [`peft.get_peft_model`] with a [`MuScleLoraConfig`] after `import peft_musclelora`.

    Args:
        model: The model to adapt.
        config: The adapter configuration.
        adapter_name: Name of the adapter, `"default"` by default.
        low_cpu_mem_usage: Create the adapter weights on the meta device (to be loaded later).

    Example:
        >>> import torch
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from peft_musclelora import MuScleLoraConfig
        >>> base = BertForSequenceClassification(
        ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        ...                vocab_size=100)
        ... ).eval()
        >>> ids = torch.tensor([[1, 2, 3, 4]])
        >>> before = base(input_ids=ids).logits
        >>> config = MuScleLoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], scales=[1, 2, 4, 8], r=1)
        >>> model = get_peft_model(base, config)
        >>> type(model.base_model).__name__
        'MuScleLoraModel'
        >>> model.base_model.targeted_module_names[:2]
        ['bert.encoder.layer.0.attention.self.query', 'bert.encoder.layer.0.attention.self.value']
        >>> torch.allclose(model(input_ids=ids).logits, before)  # B = 0 at creation: a no-op until trained
        True
    """

    prefix: str = "musclelora_"
    tuner_layer_cls = MuScleLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        self._unmatched_patterns = self._pattern_fields(self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        unmatched = {name: sorted(keys) for name, keys in self._unmatched_patterns.items() if keys}
        if unmatched:
            details = "; ".join(f"`{name}` keys {keys}" for name, keys in unmatched.items())
            raise ValueError(
                f"MuScleLoraConfig patterns matched no adapted module of adapter {adapter_name!r}: {details}. "
                f"Adapted modules: {sorted(self.targeted_module_names)}."
            )

    @staticmethod
    def _pattern_fields(config: MuScleLoraConfig) -> dict[str, set[str]]:
        return {name: set(getattr(config, name)) for name in ("scale_pattern", "rank_pattern", "alpha_pattern")}

    def _resolve(self, config: MuScleLoraConfig, field_name: str, default: Any, module_name: str) -> Any:
        patterns = getattr(config, field_name)
        key = _first_matching_pattern(patterns, module_name)
        if key is None:
            return default
        self._unmatched_patterns.get(field_name, set()).discard(key)
        return patterns[key]

    def _create_and_replace(
        self,
        config: MuScleLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        *,
        parameter_name: Optional[str] = None,
    ) -> None:
        if parameter_name is not None:
            raise ValueError("MuScleLoRA adapts modules only; `target_parameters` is not supported.")
        if current_key is None:
            raise ValueError("Current key shouldn't be `None`.")
        layer_kwargs = {
            "r": self._resolve(config, "rank_pattern", config.r, current_key),
            "lora_alpha": self._resolve(config, "alpha_pattern", config.lora_alpha, current_key),
            "scales": self._resolve(config, "scale_pattern", config.scales, current_key),
            "lora_dropout": config.lora_dropout,
            "init_weights": config.init_weights,
        }
        if isinstance(target, MuScleLoraLayer):
            target.update_layer(adapter_name, inference_mode=config.inference_mode, **layer_kwargs)
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # As LoraModel does: BaseTuner's version re-ties `new_module.weight = child.weight`, which fails when
        # unloading a module to save that has no `weight` of its own (e.g. RoBERTa's classification head).
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        weight = getattr(child, "weight", None)
        if weight is None:
            weight = next(child.parameters(), None)
        if weight is None:
            return
        meta = torch.device("meta")
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device == meta for p in module.parameters()):
                module.to(weight.device)

    @staticmethod
    def _create_new_module(
        config: MuScleLoraConfig, adapter_name: str, target: nn.Module, module_name: str, **kwargs: Any
    ) -> Linear:
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not _is_supported_base_layer(base_layer):
            raise TypeError(
                f"Target module {module_name!r} is a {type(base_layer).__name__}; MuScleLoRA supports "
                "torch.nn.Linear, transformers' Conv1D and bitsandbytes Linear4bit/Linear8bitLt. "
                "Adjust `target_modules`."
            )
        fan_in_fan_out = config.fan_in_fan_out
        is_conv1d = isinstance(base_layer, Conv1D)
        if is_conv1d and not fan_in_fan_out:
            warnings.warn(
                f"{module_name!r} is a Conv1D but fan_in_fan_out is False; using fan_in_fan_out=True.", stacklevel=2
            )
            fan_in_fan_out = True
        elif not is_conv1d and fan_in_fan_out:
            warnings.warn(
                f"{module_name!r} is a linear layer but fan_in_fan_out is True; using fan_in_fan_out=False.",
                stacklevel=2,
            )
            fan_in_fan_out = False
        return Linear(
            target,
            adapter_name,
            fan_in_fan_out=fan_in_fan_out,
            is_target_conv_1d_layer=is_conv1d,
            **kwargs,
        )
