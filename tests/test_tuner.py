"""Acceptance tests of the MSLR tuner: one matrix of (tiny model, config) cases run through the same checks.

A new model or config is one line in `MODEL_CASES` (conftest.py) or `CONFIG_CASES` below.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_musclelora import MuScleLoraConfig, MuScleLoraLayer

from .conftest import (
    BATCH_SIZE,
    MODEL_CASES,
    SEED,
    TinyModelCase,
    make_inputs,
    model_output,
)

# Each config case is a function of the model case, so that pattern keys can name one of its targets.
CONFIG_CASES: dict[str, Any] = {
    "single-scale": lambda case: {"scales": [1.0], "r": 4, "lora_alpha": 8},
    "multi-scale": lambda case: {"scales": [1.0, 2.0, 4.0], "r": 2, "lora_alpha": 4},
    "scale-pattern-subset": lambda case: {
        "scales": [1.0],
        "r": 2,
        "scale_pattern": {case.target_modules[0]: [1, 3, 9]},
        "rank_pattern": {case.target_modules[0]: 1},
        "alpha_pattern": {case.target_modules[0]: 3},
    },
    "init-kaiming": lambda case: {"scales": [1.0, 2.0], "r": 2, "init_weights": "kaiming"},
    "init-random": lambda case: {"scales": [1.0, 2.0], "r": 2, "init_weights": False},
}
NO_OP_AT_INIT = {"single-scale", "multi-scale", "scale-pattern-subset"}

MATRIX = [
    pytest.param(model_case, name, id=f"{model_case}-{name}") for model_case in MODEL_CASES for name in CONFIG_CASES
]


def make_config(case: TinyModelCase, config_name: str, **overrides: Any) -> MuScleLoraConfig:
    kwargs = {
        "task_type": case.task_type,
        "target_modules": list(case.target_modules),
        "fan_in_fan_out": case.conv1d,
        **CONFIG_CASES[config_name](case),
        **overrides,
    }
    return MuScleLoraConfig(**kwargs)


def make_adapters_nontrivial(model: nn.Module, seed: int = SEED + 1) -> None:
    """Give every trainable parameter (adapter factors and modules to save) random values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator).to(param))


def make_loss(model: nn.Module, case: TinyModelCase, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if case.task_type == "CAUSAL_LM":
        return model(**inputs, labels=inputs["input_ids"]).loss
    return model(**inputs, labels=torch.arange(BATCH_SIZE) % 2).loss


def adapted_layers(model: nn.Module) -> list[MuScleLoraLayer]:
    return [module for module in model.modules() if isinstance(module, MuScleLoraLayer)]


def reference_delta_weight(layer: MuScleLoraLayer, adapter_name: str) -> torch.Tensor:
    """The specification of the weight change, branch by branch in float64: `alpha / r * sum_j k_j B_j A_j`."""
    r = layer.r[adapter_name]
    lora_A = layer.musclelora_A[adapter_name].weight.detach().double()
    lora_B = layer.musclelora_B[adapter_name].weight.detach().double()
    delta = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    for j, k in enumerate(layer.scales(adapter_name)):
        branch = slice(j * r, (j + 1) * r)
        delta += k * lora_B[:, branch] @ lora_A[branch]
    delta *= layer.lora_alpha[adapter_name] / r
    return delta.T if layer.fan_in_fan_out else delta


# --------------------------------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "config_name"), MATRIX)
def test_forward_equals_base_exactly_when_init_is_a_no_op(case: TinyModelCase, config_name: str) -> None:
    inputs = make_inputs()
    base_output = model_output(case.build(), inputs)
    model = get_peft_model(case.build(), make_config(case, config_name))

    output = model_output(model, inputs)

    assert output.shape == base_output.shape
    assert len(adapted_layers(model)) > 0
    if config_name in NO_OP_AT_INIT:
        assert torch.equal(output, base_output)
    else:
        assert not torch.allclose(output, base_output, atol=1e-4)


@pytest.mark.parametrize("case", MODEL_CASES, ids=str)
def test_dropout_in_train_mode_keeps_output_shape(case: TinyModelCase) -> None:
    inputs = make_inputs()
    model = get_peft_model(case.build(), make_config(case, "multi-scale", lora_dropout=0.5))
    model.train()

    output = model(**inputs).logits

    assert output.shape == model_output(case.build(), inputs).shape
    assert all(isinstance(layer.musclelora_dropout["default"], nn.Dropout) for layer in adapted_layers(model))


@pytest.mark.parametrize(("case", "config_name"), MATRIX)
def test_backward_gives_grads_only_on_adapters_and_modules_to_save(case: TinyModelCase, config_name: str) -> None:
    model = get_peft_model(case.build(), make_config(case, config_name))

    make_loss(model, case, make_inputs()).backward()

    with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert with_grad == trainable
    assert all("musclelora_" in name or "modules_to_save" in name for name in with_grad)
    adapter_b_grads = [param.grad for name, param in model.named_parameters() if ".musclelora_B." in name]
    assert len(adapter_b_grads) == len(adapted_layers(model))
    assert any(grad.abs().sum() > 0 for grad in adapter_b_grads)
    if case.head is not None:
        assert any(f"{case.head}.modules_to_save.default" in name for name in with_grad)


@pytest.mark.parametrize(("case", "config_name"), MATRIX)
def test_merge_unmerge_merge_and_unload_and_unload_are_equivalent(case: TinyModelCase, config_name: str) -> None:
    inputs = make_inputs()
    base_output = model_output(case.build(), inputs)
    model = get_peft_model(case.build(), make_config(case, config_name))
    make_adapters_nontrivial(model)
    adapted_output = model_output(model, inputs)
    assert not torch.allclose(adapted_output, base_output, atol=1e-4)
    never_merged = copy.deepcopy(model)

    model.merge_adapter()
    assert all(layer.merged for layer in adapted_layers(model))
    torch.testing.assert_close(model_output(model, inputs), adapted_output, atol=1e-5, rtol=0)

    model.unmerge_adapter()
    assert not any(layer.merged for layer in adapted_layers(model))
    torch.testing.assert_close(model_output(model, inputs), adapted_output, atol=1e-5, rtol=0)

    merged = model.merge_and_unload()
    assert not any(isinstance(module, BaseTunerLayer) for module in merged.modules())
    torch.testing.assert_close(model_output(merged, inputs), adapted_output, atol=1e-5, rtol=0)

    unloaded = never_merged.unload()
    assert not any(isinstance(module, BaseTunerLayer) for module in unloaded.modules())
    assert not any("musclelora_" in name for name, _ in unloaded.named_parameters())
    base = case.build()
    if case.head is not None:
        # unload() keeps the trained head (a module to save): the base model with that head is what remains.
        getattr(base, case.head).load_state_dict(getattr(unloaded, case.head).state_dict())
    assert torch.equal(model_output(unloaded, inputs), model_output(base, inputs))


@pytest.mark.parametrize(("case", "config_name"), MATRIX)
def test_save_pretrained_then_from_pretrained_gives_identical_outputs(
    case: TinyModelCase, config_name: str, tmp_path: os.PathLike
) -> None:
    inputs = make_inputs()
    model = get_peft_model(case.build(), make_config(case, config_name))
    make_adapters_nontrivial(model)
    expected = model_output(model, inputs)

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.build(), tmp_path)

    files = set(os.listdir(tmp_path))
    assert "adapter_model.safetensors" in files
    assert "adapter_config.json" in files
    assert not any(name.endswith(".bin") for name in files)
    assert isinstance(loaded.peft_config["default"], MuScleLoraConfig)
    assert torch.equal(model_output(loaded, inputs), expected)
    for original, restored in zip(adapted_layers(model), adapted_layers(loaded)):
        assert restored.scales("default") == original.scales("default")


@pytest.mark.parametrize(("case", "config_name"), MATRIX)
def test_peft_config_from_pretrained_round_trips(case: TinyModelCase, config_name: str, tmp_path: os.PathLike) -> None:
    config = make_config(case, config_name)
    config.save_pretrained(tmp_path)

    loaded = PeftConfig.from_pretrained(tmp_path)

    assert isinstance(loaded, MuScleLoraConfig)
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(("case", "config_name"), MATRIX)
def test_disable_adapter_context_gives_base_outputs(case: TinyModelCase, config_name: str) -> None:
    inputs = make_inputs()
    base_output = model_output(case.build(), inputs)
    model = get_peft_model(case.build(), make_config(case, config_name))
    make_adapters_nontrivial(model)
    adapted_output = model_output(model, inputs)

    with model.disable_adapter():
        disabled_output = model_output(model, inputs)

    assert torch.equal(disabled_output, base_output)
    assert torch.equal(model_output(model, inputs), adapted_output)


@pytest.mark.parametrize(("case", "config_name"), MATRIX)
def test_bfloat16_forward_backward_and_merge(case: TinyModelCase, config_name: str) -> None:
    inputs = make_inputs()
    base = case.build().to(torch.bfloat16)
    base_output = model_output(base, inputs)
    # autocast_adapter_dtype=False keeps the adapter in bfloat16 too (by default PEFT keeps adapters in float32).
    model = get_peft_model(
        case.build().to(torch.bfloat16), make_config(case, config_name), autocast_adapter_dtype=False
    )
    assert all(param.dtype == torch.bfloat16 for name, param in model.named_parameters() if "musclelora_" in name)

    output = model_output(model, inputs)
    assert output.dtype == torch.bfloat16
    if config_name in NO_OP_AT_INIT:
        assert torch.equal(output, base_output)

    make_loss(model, case, inputs).backward()
    assert all(
        param.grad is not None and torch.isfinite(param.grad).all()
        for param in model.parameters()
        if param.requires_grad
    )

    make_adapters_nontrivial(model)
    layers = adapted_layers(model)
    weights = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    deltas = [reference_delta_weight(layer, "default") for layer in layers]
    model.merge_adapter()
    # Merging rounds twice to bfloat16 (the delta, then the sum): each costs at most half a unit in the last place.
    for layer, weight, delta in zip(layers, weights, deltas):
        exact = weight.double() + delta.double()
        merged = layer.get_base_layer().weight.detach().double()
        assert ((merged - exact).abs() <= 2**-8 * (delta.double().abs() + exact.abs()) + 1e-30).all()


def test_adapter_on_bfloat16_base_is_float32_by_default_and_output_keeps_base_dtype() -> None:
    case = MODEL_CASES[-1]
    inputs = make_inputs()
    base_output = model_output(case.build().to(torch.bfloat16), inputs)
    model = get_peft_model(case.build().to(torch.bfloat16), make_config(case, "multi-scale"))

    output = model_output(model, inputs)

    assert all(param.dtype == torch.float32 for name, param in model.named_parameters() if "musclelora_" in name)
    assert output.dtype == torch.bfloat16
    assert torch.equal(output, base_output)
