"""MSLR on bitsandbytes-quantized layers (4-bit NF4 `Linear4bit`, 8-bit `Linear8bitLt`), on CPU.

The base is a tiny Llama (hidden 128: bitsandbytes' CPU 4-bit path needs in_features >= 128) saved to a temporary
directory and loaded back with a `BitsAndBytesConfig`, the way users load a quantized model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from peft_musclelora import MuScleLoraConfig, MuScleLoraLayer, MuScleLoraTrainer, MuScleLoraTrainingArguments
from peft_musclelora.bnb import keep_4bit_weights_trainable

from .bnb_helpers import assert_merge_is_the_bnb_round_trip
from .conftest import SEED, make_inputs, model_output

bnb = pytest.importorskip("bitsandbytes")

pytestmark = [
    pytest.mark.bitsandbytes,
    pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
    pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes"),
]

QUANTIZATIONS = {
    "nf4": (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        bnb.nn.Linear4bit,
    ),
    "int8": (BitsAndBytesConfig(load_in_8bit=True), bnb.nn.Linear8bitLt),
}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_quantized(path: Path, quantization: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=QUANTIZATIONS[quantization][0], device_map="cpu"
    ).eval()


def make_config(init_weights: bool | str = True) -> MuScleLoraConfig:
    return MuScleLoraConfig(
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj", "down_proj"],
        r=2,
        lora_alpha=4,
        scales=[1.0, 2.0, 4.0],
        init_weights=init_weights,
    )


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_wraps_quantized_layers_and_is_a_no_op_at_init(tiny_llama_dir: Path, quantization: str) -> None:
    inputs = make_inputs()
    base_output = model_output(load_quantized(tiny_llama_dir, quantization), inputs)
    model = get_peft_model(load_quantized(tiny_llama_dir, quantization), make_config())

    layers = [module for module in model.modules() if isinstance(module, MuScleLoraLayer)]
    assert len(layers) == 3
    assert all(isinstance(layer.get_base_layer(), QUANTIZATIONS[quantization][1]) for layer in layers)
    assert torch.equal(model_output(model, inputs), base_output)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_backward_reaches_only_the_adapters(tiny_llama_dir: Path, quantization: str) -> None:
    model = get_peft_model(load_quantized(tiny_llama_dir, quantization), make_config("kaiming"))
    inputs = make_inputs()

    model(**inputs, labels=inputs["input_ids"]).loss.backward()

    with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
    assert with_grad == {name for name, param in model.named_parameters() if param.requires_grad}
    assert len(with_grad) == 6
    assert all("musclelora_" in name for name in with_grad)
    assert all(
        torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
        for param in model.parameters()
        if param.requires_grad
    )


def test_an_evaluation_pass_does_not_stop_a_4bit_model_from_training(tiny_llama_dir: Path) -> None:
    # bitsandbytes repacks 4-bit weights for its CPU inference kernel in eval mode without grad (on CPUs with
    # AVX512-BF16), and the packed kernel cuts the gradient: after keep_4bit_weights_trainable it never packs.
    model = get_peft_model(load_quantized(tiny_llama_dir, "nf4"), make_config("kaiming"))
    keep_4bit_weights_trainable(model)
    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(layer, "support_avx512bf16_for_cpu", False) for layer in layers)
    inputs = make_inputs()
    with torch.no_grad():
        model.eval()(**inputs)  # an evaluation pass, as between two epochs
    model.train()(**inputs, labels=inputs["input_ids"]).loss.backward()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert {name for name, param in model.named_parameters() if param.grad is not None} == trainable
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)


def test_the_trainer_keeps_a_4bit_model_trainable(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model = get_peft_model(load_quantized(tiny_llama_dir, "nf4"), make_config("kaiming"))
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on such a CPU; never run packed here
    args = MuScleLoraTrainingArguments(output_dir=str(tmp_path), gradient_alignment=False, report_to=[], use_cpu=True)
    MuScleLoraTrainer(model=model, args=args, train_dataset=[{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_merge_into_quantized_weight_warns_and_adds_only_the_requantization_error(
    tiny_llama_dir: Path, quantization: str
) -> None:
    inputs = make_inputs()
    base_output = model_output(load_quantized(tiny_llama_dir, quantization), inputs)
    model = get_peft_model(load_quantized(tiny_llama_dir, quantization), make_config(init_weights=False))
    assert (model_output(model, inputs) - base_output).abs().max() > 0.1  # the adapter does something to merge

    assert_merge_is_the_bnb_round_trip(model, inputs, model.merge_adapter)


@pytest.mark.parametrize("quantization", ["nf4"])
def test_adapter_on_4bit_base_saves_and_loads_identically(
    tiny_llama_dir: Path, quantization: str, tmp_path: Path
) -> None:
    inputs = make_inputs()
    model = get_peft_model(load_quantized(tiny_llama_dir, quantization), make_config(init_weights=False))
    expected = model_output(model, inputs)

    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "missing adapter keys" warning on load
        loaded = PeftModel.from_pretrained(load_quantized(tiny_llama_dir, quantization), tmp_path)

    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    assert torch.equal(model_output(loaded, inputs), expected)
