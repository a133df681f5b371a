"""Acceptance tests of the MSLR tuner: one matrix of (tiny model, config) cases run through the same checks.

A new model or config is one line in `MODEL_CASES` (conftest.py) or `CONFIG_CASES` below.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    LoraConfig,
    PeftConfig,
    PeftMixedModel,
    PeftModel,
    get_peft_model,
    inject_adapter_in_model,
)
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType
from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments

import peft_musclelora
from peft_musclelora import MuScleLoraConfig, MuScleLoraLayer

from .conftest import (
    BATCH_SIZE,
    MODEL_CASES,
    MODEL_CASES_BY_NAME,
    SEED,
    SEQ_LEN,
    TinyModelCase,
    TwoLayerMLP,
    make_inputs,
    make_mlp,
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
    config = model.peft_config["default"]
    for name, layer in model.named_modules():
        if isinstance(layer, MuScleLoraLayer):
            patterned = name.endswith(case.target_modules[0]) and bool(config.scale_pattern)
            assert layer.scales("default") == (
                config.scale_pattern[case.target_modules[0]] if patterned else config.scales
            )
            assert layer.r["default"] == (1 if patterned else config.r)
            assert layer.musclelora_A["default"].weight.shape == (
                len(layer.scales("default")) * layer.r["default"],
                layer.in_features,
            )
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


# --------------------------------------------------------------------------------------------------------------------
# LoRA equivalence and the reference forward
# --------------------------------------------------------------------------------------------------------------------


def _mlp_and_targets() -> tuple[nn.Module, list[str], bool]:
    return make_mlp(), ["lin0", "lin1"], False


def _gpt2_and_targets() -> tuple[nn.Module, list[str], bool]:
    case = MODEL_CASES_BY_NAME["gpt2-causal"]
    return case.build(), list(case.target_modules), True


BASES_FOR_LORA_EQUIVALENCE = [
    pytest.param(_mlp_and_targets, id="nn.Linear"),
    pytest.param(_gpt2_and_targets, id="gpt2-Conv1D"),
]


def _forward_for_equivalence(model: nn.Module) -> torch.Tensor:
    if isinstance(model.get_base_model(), TwoLayerMLP):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(SEED))
        return model(x)
    return model(**make_inputs()).logits


@pytest.mark.parametrize("make_base", BASES_FOR_LORA_EQUIVALENCE)
def test_single_scale_is_bit_identical_to_peft_lora(make_base: Any) -> None:
    base, targets, fan_in_fan_out = make_base()
    common = {"r": 4, "lora_alpha": 8, "target_modules": targets, "fan_in_fan_out": fan_in_fan_out}
    torch.manual_seed(SEED + 7)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **common))
    torch.manual_seed(SEED + 7)
    mslr = get_peft_model(copy.deepcopy(base), MuScleLoraConfig(scales=[1.0], init_weights=False, **common))

    lora_params = {name: param for name, param in lora.named_parameters() if param.requires_grad}
    mslr_params = {
        name.replace("musclelora_", "lora_"): param for name, param in mslr.named_parameters() if param.requires_grad
    }
    assert lora_params.keys() == mslr_params.keys()
    assert all(torch.equal(lora_params[name], mslr_params[name]) for name in lora_params)

    lora_output = _forward_for_equivalence(lora)
    mslr_output = _forward_for_equivalence(mslr)
    assert torch.equal(lora_output, mslr_output)

    lora_output.square().sum().backward()
    mslr_output.square().sum().backward()
    assert all(torch.equal(lora_params[name].grad, mslr_params[name].grad) for name in lora_params)


def reference_mslr_forward(layer: MuScleLoraLayer, x: torch.Tensor, adapter_name: str = "default") -> torch.Tensor:
    """The specification: `W0 x + alpha / r * sum_j B_j A_j (k_j x)`, one branch at a time."""
    r = layer.r[adapter_name]
    lora_A = layer.musclelora_A[adapter_name].weight
    lora_B = layer.musclelora_B[adapter_name].weight
    result = layer.base_layer(x)
    for j, k in enumerate(layer.scales(adapter_name)):
        A_j = lora_A[j * r : (j + 1) * r]
        B_j = lora_B[:, j * r : (j + 1) * r]
        result = result + (k * x) @ A_j.T @ B_j.T * (layer.lora_alpha[adapter_name] / r)
    return result


@pytest.mark.parametrize("make_base", BASES_FOR_LORA_EQUIVALENCE)
def test_stacked_forward_and_merged_weight_equal_the_branch_by_branch_specification(make_base: Any) -> None:
    base, targets, fan_in_fan_out = make_base()
    config = MuScleLoraConfig(
        r=2,
        lora_alpha=6,
        scales=[1.0, 2.5, 4.0],
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        init_weights=False,
    )
    model = get_peft_model(base, config)

    for layer in adapted_layers(model):
        x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(SEED))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference_mslr_forward(layer, x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                layer.get_delta_weight("default").double(), reference_delta_weight(layer, "default"), atol=1e-5, rtol=0
            )


# --------------------------------------------------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------------------------------------------------


def test_trainable_parameter_count_is_stacked_rank_times_in_plus_out(capsys: pytest.CaptureFixture[str]) -> None:
    case = MODEL_CASES_BY_NAME["llama-causal"]
    config = MuScleLoraConfig(
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj", "down_proj"],
        r=2,
        scales=[1, 2, 4, 8],
        scale_pattern={"down_proj": [1, 2, 3, 4, 5, 6, 7, 8, 9]},
        rank_pattern={"down_proj": 1},
    )
    model = get_peft_model(case.build(), config)

    expected = sum(
        len(layer.scales("default")) * layer.r["default"] * (layer.in_features + layer.out_features)
        for layer in adapted_layers(model)
    )
    # q_proj, v_proj: 4 scales x r=2 x (16 + 16); down_proj: 9 scales x r=1 x (32 + 16).
    assert expected == 2 * 4 * 2 * 32 + 9 * 1 * 48
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert total == expected + sum(param.numel() for param in case.build().parameters())
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


def test_parameter_names_follow_module_factor_adapter_weight() -> None:
    model = get_peft_model(make_mlp(), MuScleLoraConfig(target_modules=["lin0", "lin1"]))

    names = sorted(name for name, _ in model.named_parameters() if "musclelora_" in name)

    assert names == [
        "base_model.model.lin0.musclelora_A.default.weight",
        "base_model.model.lin0.musclelora_B.default.weight",
        "base_model.model.lin1.musclelora_A.default.weight",
        "base_model.model.lin1.musclelora_B.default.weight",
    ]


def test_inject_adapter_in_model_adapts_in_place_without_a_peft_wrapper(mlp_inputs: torch.Tensor) -> None:
    base_output = make_mlp()(mlp_inputs)
    model = inject_adapter_in_model(MuScleLoraConfig(target_modules=["lin0"], scales=[1, 2]), make_mlp())

    assert isinstance(model, TwoLayerMLP)
    assert isinstance(model.lin0, MuScleLoraLayer)
    assert not isinstance(model.lin1, MuScleLoraLayer)
    assert torch.equal(model(mlp_inputs), base_output)


def test_add_set_and_delete_adapter_switch_outputs(mlp_inputs: torch.Tensor) -> None:
    targets = ["lin0", "lin1"]
    model = get_peft_model(make_mlp(), MuScleLoraConfig(target_modules=targets, scales=[1, 2], init_weights=False))
    default_output = model(mlp_inputs)
    model.add_adapter("other", MuScleLoraConfig(target_modules=targets, scales=[1, 3, 9], r=1, init_weights=False))
    assert torch.equal(model(mlp_inputs), default_output), "add_adapter must not activate the new adapter"

    model.set_adapter("other")
    layer = model.base_model.model.lin0
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(SEED + 3))
    assert model.active_adapters == ["other"]
    assert layer.scales("default") == [1.0, 2.0]
    assert layer.scales("other") == [1.0, 3.0, 9.0]
    assert layer.musclelora_A["other"].weight.shape == (3, 16)
    torch.testing.assert_close(layer(x), reference_mslr_forward(layer, x, "other"), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(model(mlp_inputs), default_output)

    model.set_adapter("default")
    assert torch.equal(model(mlp_inputs), default_output)

    model.delete_adapter("other")
    assert not any(".other." in name for name, _ in model.named_parameters())
    assert "other" not in model.peft_config
    assert "other" not in layer.musclelora_scales
    assert torch.equal(model(mlp_inputs), default_output)


def test_two_active_adapters_with_different_scales_add_up() -> None:
    targets = ["lin0", "lin1"]
    model = get_peft_model(make_mlp(), MuScleLoraConfig(target_modules=targets, scales=[1, 2], init_weights=False))
    model.add_adapter("other", MuScleLoraConfig(target_modules=targets, scales=[4, 8], r=3, init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    layer = model.base_model.model.lin0
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(SEED))

    both = (
        reference_mslr_forward(layer, x, "default") + reference_mslr_forward(layer, x, "other") - layer.base_layer(x)
    )

    torch.testing.assert_close(layer(x), both, atol=1e-5, rtol=1e-5)


def test_modules_to_save_head_is_trained_and_saved(tmp_path: Path) -> None:
    case = MODEL_CASES_BY_NAME["bert-seqcls"]
    model = get_peft_model(case.build(), make_config(case, "multi-scale"))
    head = model.base_model.model.classifier
    original_head = head.original_module.weight.detach().clone()
    optimizer = torch.optim.SGD([param for param in model.parameters() if param.requires_grad], lr=0.5)

    for _ in range(2):
        optimizer.zero_grad()
        make_loss(model, case, make_inputs()).backward()
        optimizer.step()

    assert not torch.equal(head.modules_to_save["default"].weight, original_head)
    assert torch.equal(head.original_module.weight, original_head)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.classifier.weight"], head.modules_to_save["default"].weight)


@pytest.mark.parametrize(
    ("case_name", "auto_cls"),
    [("bert-seqcls", AutoPeftModelForSequenceClassification), ("llama-causal", AutoPeftModelForCausalLM)],
)
def test_auto_peft_model_loads_from_a_local_directory(case_name: str, auto_cls: type, tmp_path: Path) -> None:
    case = MODEL_CASES_BY_NAME[case_name]
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    case.build().save_pretrained(base_dir)
    base = type(case.build()).from_pretrained(base_dir)
    model = get_peft_model(base, make_config(case, "multi-scale")).eval()
    make_adapters_nontrivial(model)
    expected = model_output(model, make_inputs())
    model.save_pretrained(adapter_dir)

    loaded = auto_cls.from_pretrained(adapter_dir)

    assert loaded.peft_config["default"].base_model_name_or_path == str(base_dir)
    assert isinstance(loaded.peft_config["default"], MuScleLoraConfig)
    assert torch.equal(model_output(loaded, make_inputs()), expected)


def test_transformers_add_adapter_and_load_adapter(tmp_path: Path) -> None:
    case = MODEL_CASES_BY_NAME["llama-causal"]
    inputs = make_inputs()
    base_output = model_output(case.build(), inputs)

    with_added = case.build()
    with_added.add_adapter(make_config(case, "multi-scale"))
    assert any(".musclelora_A.default.weight" in name for name, _ in with_added.named_parameters())
    assert torch.equal(model_output(with_added, inputs), base_output)

    peft_model = get_peft_model(case.build(), make_config(case, "init-random"))
    expected = model_output(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    with_loaded = case.build()
    with_loaded.load_adapter(str(tmp_path))
    assert torch.equal(model_output(with_loaded, inputs), expected)


@pytest.mark.parametrize("config_cls", [LoraConfig, MuScleLoraConfig], ids=["LoraConfig", "MuScleLoraConfig"])
def test_plain_trainer_script_trains_with_the_one_line_config_swap(config_cls: type, tmp_path: Path) -> None:
    case = MODEL_CASES_BY_NAME["bert-seqcls"]
    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(2, 64, (8, SEQ_LEN), generator=generator)
    train = Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": (input_ids[:, 0] % 2).tolist()})
    # The line a LoRA user changes: LoraConfig -> MuScleLoraConfig, same arguments.
    config = config_cls(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
    model = get_peft_model(case.build(), config)
    before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )

    result = Trainer(model=model, args=args, train_dataset=train).train()

    assert result.global_step == 4
    assert math.isfinite(result.training_loss)
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[name], value) for name, value in before.items() if "_B." in name)


def test_importing_twice_and_reloading_keeps_one_registration(mlp_inputs: torch.Tensor) -> None:
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING["MUSCLELORA"]
    member = PeftType.MUSCLELORA

    importlib.import_module("peft_musclelora")
    importlib.reload(peft_musclelora.peft_type)
    importlib.reload(peft_musclelora)

    assert PeftType.MUSCLELORA is member
    assert PeftType("MUSCLELORA") is member
    assert list(PeftType).count(member) == 1
    assert PEFT_TYPE_TO_TUNER_MAPPING["MUSCLELORA"] is tuner_cls
    model = get_peft_model(make_mlp(), peft_musclelora.MuScleLoraConfig(target_modules=["lin0"]))
    assert torch.equal(model(mlp_inputs), make_mlp()(mlp_inputs))


# --------------------------------------------------------------------------------------------------------------------
# Documented refusals
# --------------------------------------------------------------------------------------------------------------------


def test_mixed_adapter_models_are_refused() -> None:
    config = MuScleLoraConfig(target_modules=["lin0"])

    with pytest.raises(ValueError, match="MUSCLELORA.*not compatible with the `PeftMixedModel`"):
        get_peft_model(make_mlp(), config, mixed=True)
    with pytest.raises(ValueError, match="MUSCLELORA.*not compatible with the `PeftMixedModel`"):
        PeftMixedModel(make_mlp(), config)


def test_lora_hotswap_is_refused(tmp_path: Path) -> None:
    model = get_peft_model(make_mlp(), MuScleLoraConfig(target_modules=["lin0", "lin1"], init_weights=False))
    model.save_pretrained(tmp_path)
    state_dict = {name: param.detach().clone() for name, param in model.named_parameters() if "musclelora_" in name}
    weights_before = copy.deepcopy(state_dict)

    with pytest.raises(ValueError, match="Hotswapping only supports LORA but MUSCLELORA"):
        hotswap_adapter(model, str(tmp_path), adapter_name="default")
    with pytest.raises(ValueError, match="hot-swapping .* do not support MuScleLoRA"):
        hotswap_adapter_from_state_dict(model, state_dict, adapter_name="default", config=model.peft_config["default"])

    current = dict(model.named_parameters())
    assert all(torch.equal(current[name], value) for name, value in weights_before.items())


class _WithUnsupportedLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 3, 1)
        self.proj = nn.Linear(8, 8)


@pytest.mark.parametrize(("target", "type_name"), [("embed", "Embedding"), ("conv", "Conv2d")])
def test_unsupported_target_raises_type_error_naming_the_module(target: str, type_name: str) -> None:
    with pytest.raises(TypeError, match=rf"Target module '{target}' is a {type_name}; MuScleLoRA supports"):
        get_peft_model(_WithUnsupportedLayers(), MuScleLoraConfig(target_modules=[target, "proj"]))
