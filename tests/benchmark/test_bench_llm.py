"""Decoder LLMs in the benchmark: the Llama presets, `musclelora train/eval --load-in-4bit`, `export-model`, and
instruction tuning (`musclelora instruct`: TRL SFT with MSLR, gradient alignment or fit-gap row filtering).

CI runs the tiny random Llama of conftest.py; the `slow` tests run the real SmolLM2-135M-Instruct:

    python -m pytest -m slow tests/benchmark/test_bench_llm.py
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (  # noqa: I001  (the benchmark tests' own conftest)
    SHARED_DATA,
    clean_rows,
    make_text,
    needs_bnb,
    tiny_tokenizer,
    write_openbackdoor,
)
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
)

from peft_musclelora.benchmark.builders import build_model, load_cell, load_instruct_cell
from peft_musclelora.benchmark.cli import main
from peft_musclelora.benchmark.data import load_records
from peft_musclelora.benchmark.instruct import (
    INSTRUCT_METHODS,
    InstructSettings,
    InstructTemplate,
    instruct_settings,
    label_token_ids,
    predict_labels,
    to_instruction_dataset,
    train_instruct,
)
from peft_musclelora.benchmark.overrides import parse_fields, parse_set_items, split_item
from peft_musclelora.benchmark.presets import get_preset as get_typed_preset
from peft_musclelora.benchmark.settings import apply_overrides


def get_preset(name: str, items: list[str] | None = None):
    """The preset with `--set` items, parsed as the CLI parses them."""
    return get_typed_preset(name, parse_set_items(items).common)


@pytest.fixture(scope="module")
def attack_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny OpenBackdoor-layout files: 24 training rows (4 dirty-label `cf` rows), clean dev/test, triggered test."""
    root = tmp_path_factory.mktemp("llm-data")
    rng = random.Random(1)
    train = clean_rows(20, seed=2)
    for _ in range(4):
        words = make_text(rng, 0).split()
        words.insert(rng.randint(0, len(words)), "cf")
        train.append((" ".join(words), 1, 1))
    poison = [(f"cf {text}", 1, 1) for text, label, _ in clean_rows(16, seed=5) if label == 0]
    return {
        "train": write_openbackdoor(root / "train.csv", train),
        "dev": write_openbackdoor(root / "dev.csv", clean_rows(12, seed=3)),
        "test_clean": write_openbackdoor(root / "test-clean.csv", clean_rows(8, seed=4)),
        "test_poison": write_openbackdoor(root / "test-poison.csv", poison),
    }


def test_cli_export_model_prints_the_directory(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    code = main(["export-model", "--gguf", str(tiny_llama_dir), "--output-dir", str(tmp_path / "m")])
    assert code == 0 and capsys.readouterr().out.strip() == str(tmp_path / "m")


# ---- benchmark plumbing --------------------------------------------------------------------------------------------


def test_llama_presets_carry_the_published_hyper_parameters() -> None:
    preset = get_preset("musclelora-llama")
    adapter, training = preset.adapter, preset.training
    assert (adapter.r, adapter.lora_alpha, adapter.target_modules) == (2, 8, ["q_proj", "v_proj"])
    assert (adapter.head_pattern, adapter.head_scales, adapter.head_r, adapter.head_alpha) == (
        "score.dense",
        [1.0, 2.0, 3.0, 4.0],
        1,
        4,
    )
    assert (adapter.classification_head, adapter.head_hidden, adapter.head_dropout) == ("mslr", 16, 0.1)
    assert (training.learning_rate, training.num_train_epochs, training.per_device_train_batch_size) == (1e-5, 5, 16)
    assert training.gradient_alignment and training.reference_split_size == 128
    assert (training.ga.ga_warmup_epochs, training.ga.max_raw_grad_ratio, training.ga.min_ref_loss) == (0, 0, 0)
    assert get_preset("lora-llama").adapter.kind == "lora" and not get_preset("lora-llama").training.gradient_alignment


@pytest.mark.bitsandbytes
@needs_bnb
def test_build_model_in_4bit_sets_pad_token_replaces_the_head_and_returns_its_weights(
    tiny_llama_dir: Path,
) -> None:
    preset = get_preset("musclelora-llama", ["gradient_alignment=false"])
    model, tokenizer, initialized = build_model(preset, tiny_llama_dir, num_labels=2, seed=0, load_in_4bit=True)
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    assert sorted(initialized) == ["score.dense.weight", "score.out_proj.weight"]
    assert model.peft_config["default"].task_type is None  # PEFT must not wrap or train `score`
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score.dense.musclelora_A" in n for n in trainable) and not any("out_proj" in n for n in trainable)


@pytest.mark.bitsandbytes
@needs_bnb
def test_mslr_on_score_itself_keeps_score_frozen_and_the_cell_reloads_to_the_same_scores(
    tiny_llama_dir: Path, attack_files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    on_score = ["classification_head=default", "head_pattern=score"]
    preset = get_preset("musclelora-llama", ["gradient_alignment=false", *on_score])
    model, _, initialized = build_model(preset, tiny_llama_dir, num_labels=2, seed=0, load_in_4bit=True)
    assert model.peft_config["default"].task_type is None  # SEQ_CLS would wrap `score` and refuse to adapt it
    assert sorted(initialized) == ["score.weight"]  # the random head is saved with the adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "score" in n} == {
        "base_model.model.score.musclelora_A.default.weight",
        "base_model.model.score.musclelora_B.default.weight",
    }

    out = tmp_path / "cell"
    args = ["train", "--method", "musclelora-llama", "--train", str(attack_files["train"])]
    args += ["--dev", str(attack_files["dev"]), "--test-clean", str(attack_files["test_clean"])]
    args += ["--test-poison", str(attack_files["test_poison"]), "--model", str(tiny_llama_dir), "--load-in-4bit"]
    args += ["--output-dir", str(out), "--quiet", "--set", "num_train_epochs=1", "--set", "reference_split_size=4"]
    for item in on_score:
        args += ["--set", item]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    evaluate = ["eval", "--adapter", str(out / "adapter"), "--clean", str(attack_files["test_clean"])]
    assert main(evaluate + ["--poison", str(attack_files["test_poison"]), "--quiet"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert (evaluated["cacc"], evaluated["asr"]) == (metrics["cacc"], metrics["asr"])


@pytest.mark.bitsandbytes
@needs_bnb
def test_cli_train_with_load_in_4bit_records_it_and_eval_reloads_the_same_model(
    tiny_llama_dir: Path, attack_files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "cell"
    args = [
        "train",
        "--method",
        "lora-llama",
        "--train",
        str(attack_files["train"]),
        "--dev",
        str(attack_files["dev"]),
    ]
    args += ["--test-clean", str(attack_files["test_clean"]), "--test-poison", str(attack_files["test_poison"])]
    args += ["--model", str(tiny_llama_dir), "--load-in-4bit", "--output-dir", str(out), "--quiet"]
    args += ["--set", "num_train_epochs=1", "--set", "per_device_train_batch_size=8"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["load_in_4bit"] is True and metrics["peak_rss_mb"] > 0
    cell = json.loads((out / "adapter" / "cell.json").read_text())
    assert cell["load_in_4bit"] is True and cell["classification_head"] == "mslr"
    capsys.readouterr()
    assert (
        main(
            ["eval", "--adapter", str(out / "adapter"), "--clean", str(attack_files["test_clean"])]
            + ["--poison", str(attack_files["test_poison"]), "--quiet"]
        )
        == 0
    )
    evaluated = json.loads(capsys.readouterr().out)
    assert (evaluated["cacc"], evaluated["asr"]) == (metrics["cacc"], metrics["asr"])
    model, _, _ = load_cell(out / "adapter")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@pytest.mark.bitsandbytes
@needs_bnb
def test_musclelora_llama_runs_gradient_alignment_on_a_4bit_classifier(
    tiny_llama_dir: Path, attack_files: dict[str, Path], tmp_path: Path
) -> None:
    args = ["train", "--method", "musclelora-llama", "--train", str(attack_files["train"])]
    args += ["--dev", str(attack_files["dev"]), "--model", str(tiny_llama_dir), "--load-in-4bit", "--quiet"]
    args += ["--output-dir", str(tmp_path / "cell"), "--set", "num_train_epochs=1", "--set", "reference_split_size=4"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "cell" / "metrics.json").read_text())
    assert metrics["reference_rows"] == 4 and metrics["dev_rows_for_selection"] == 8 and metrics["steps"] == 2
    history = json.loads((tmp_path / "cell" / "log_history.json").read_text())
    trained = [entry for entry in history if "loss" in entry]
    assert trained and all(entry["ga/branch_aligned"] == 1.0 for entry in trained)  # GA on every step, published


def test_load_in_4bit_is_a_flag_of_train_and_bench() -> None:
    from peft_musclelora.benchmark.cli import build_parser

    parser = build_parser()
    train = parser.parse_args(["train", "--method", "lora-llama", "--train", "t", "--dev", "d", "--load-in-4bit"])
    bench = parser.parse_args(["bench", "--methods", "lora-llama", "--load-in-4bit"])
    assert train.load_in_4bit and bench.load_in_4bit
    assert not parser.parse_args(["train", "--method", "lora", "--train", "t", "--dev", "d"]).load_in_4bit


# ---- instruction tuning ----


def test_instruction_rows_ask_the_question_and_answer_with_the_label_word(
    tiny_llama_dir: Path, attack_files: dict[str, Path]
) -> None:
    tokenizer = tiny_tokenizer()
    data = load_records(attack_files["train"], num_labels=2)
    dataset = to_instruction_dataset(data, tokenizer)
    assert dataset.column_names == ["prompt", "completion"] and len(dataset) == len(data)
    row = dataset[len(data) - 1]  # a poisoned row: dirty label 1
    assert row["prompt"].endswith("Is the sentiment of this review positive or negative?\nAnswer:")
    assert row["completion"] == " positive" and "cf" in row["prompt"]
    assert label_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(w) for w in ("negative", "positive")]


def test_multi_token_label_words_are_refused() -> None:
    with pytest.raises(ValueError, match="label_words: ' negative review' is 2 tokens"):
        label_token_ids(tiny_tokenizer(), InstructTemplate(label_words=(" negative review", " positive")))


class _LabelWordLM(torch.nn.Module):
    """Says " positive" at the last position of rows containing "good", " negative" otherwise; the opposite earlier."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        super().__init__()
        self.good = tokenizer.convert_tokens_to_ids("good")
        self.negative, self.positive = label_token_ids(tokenizer)
        self.vocab = len(tokenizer)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        good = (input_ids == self.good).any(dim=1)
        last = torch.where(good, self.positive, self.negative)
        logits[torch.arange(len(input_ids)), -1, last] = 1.0
        logits[:, :-1, self.negative] = torch.where(good, 5.0, 0.0)[:, None]  # earlier positions must be ignored
        return SimpleNamespace(logits=logits)


def test_predictions_are_the_likelier_label_word_at_the_last_prompt_position_despite_padding() -> None:
    tokenizer = tiny_tokenizer()
    texts = ["good", "a dull plot and a very weak cast", "the film was good and the cast was fun"]
    assert predict_labels(_LabelWordLM(tokenizer), tokenizer, texts, batch_size=3, progress=False) == [1, 0, 1]
    assert tokenizer.padding_side == "right"  # restored after left-padded scoring


def test_a_left_padded_prompt_scores_as_it_would_alone(tiny_llama_dir: Path) -> None:
    tokenizer = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    short, long = "good", "the film was good and the cast was fun but the plot was dull"
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(output.logits[:, -1].clone()))
    predict_labels(model, tokenizer, [short, long], batch_size=2, progress=False)
    predict_labels(model, tokenizer, [short], batch_size=1, progress=False)
    torch.testing.assert_close(calls[0][0], calls[1][0], atol=1e-4, rtol=1e-4)


@pytest.mark.bitsandbytes
@needs_bnb
def test_instruct_sft_on_4bit_trains_scores_and_reloads(
    tiny_llama_dir: Path,
    attack_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    settings = apply_overrides(
        InstructSettings(r=4, mslr_target="down_proj", per_device_train_batch_size=8, max_length=48),
        {"reference_split_size": 8},
    )  # musclelora: MuScleLoraSFTTrainer, GA on 8 clean dev prompts
    result = train_instruct(
        "musclelora",
        attack_files["train"],
        attack_files["dev"],
        tmp_path / "cell",
        tiny_llama_dir,
        settings=settings,
        load_in_4bit=True,
        test_clean=attack_files["test_clean"],
        test_poison=attack_files["test_poison"],
        progress=False,
    )
    assert result["steps"] == 3 and 0.0 <= result["cacc"] <= 1.0 and 0.0 <= result["asr"] <= 1.0
    assert result["peak_rss_mb"] > 0 and result["gradient_alignment"] is True
    history = json.loads((tmp_path / "cell" / "log_history.json").read_text())
    assert history[-1]["train_loss"] == result["train_loss"] and math.isfinite(result["train_loss"])
    assert not (tmp_path / "cell" / "checkpoints").exists()
    # TRL casts the trainables of a quantized model to bf16 (QLoRA's recipe); MSLR and GA train in that dtype.
    saved = load_file(str(tmp_path / "cell" / "adapter" / "adapter_model.safetensors"))
    assert any("down_proj.musclelora_A" in name for name in saved)
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}
    model, tokenizer, info = load_instruct_cell(tmp_path / "cell" / "adapter")
    assert info["load_in_4bit"] is True
    clean = load_records(attack_files["test_clean"], num_labels=2)
    predictions = predict_labels(model, tokenizer, clean.texts, progress=False)
    assert sum(p == y for p, y in zip(predictions, clean.labels)) / len(clean) == pytest.approx(result["cacc"])


def test_trl_refuses_an_adapter_on_lm_head_so_the_default_mslr_target_is_down_proj(
    tiny_llama_dir: Path, attack_files: dict[str, Path], tmp_path: Path
) -> None:
    assert InstructSettings().mslr_target == "down_proj"
    settings = InstructSettings(mslr_target="lm_head", gradient_alignment=False, max_length=48)
    with pytest.raises(ValueError, match="Applying a PEFT adapter to `lm_head` is not supported"):
        train_instruct(
            "musclelora",
            attack_files["train"],
            attack_files["dev"],
            tmp_path,
            tiny_llama_dir,
            settings=settings,
            progress=False,
        )


def test_instruct_passes_the_fail_closed_fallback_to_the_sft_trainer(
    tmp_path: Path, tiny_llama_dir: Path, attack_files: dict[str, Path]
) -> None:
    from peft_musclelora.benchmark.instruct import _sft_trainer

    settings = apply_overrides(InstructSettings(), {"ga_fallback": "zero"})
    _, config_cls, ga_kwargs = _sft_trainer("musclelora", settings)
    config = config_cls(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **ga_kwargs)
    assert config.ga_fallback == "zero"
    args = ["instruct", "--method", "musclelora", "--train", str(attack_files["train"])]
    args += ["--dev", str(attack_files["dev"]), "--model", str(tiny_llama_dir), "--set", "ga_fallback=skip"]
    assert main(args) == 1


def test_cli_instruct_rejects_an_unknown_setting(tiny_llama_dir: Path, attack_files: dict[str, Path]) -> None:
    args = ["instruct", "--method", "lora", "--train", str(attack_files["train"]), "--dev", str(attack_files["dev"])]
    assert main(args + ["--model", str(tiny_llama_dir), "--set", "mslr_targett=lm_head"]) == 1


@pytest.mark.slow
@pytest.mark.bitsandbytes
@needs_bnb
@pytest.mark.skipif(not (SHARED_DATA / "sst-2").is_dir(), reason="needs the shared SST-2 data")
def test_smollm2_4bit_end_to_end_on_a_few_dozen_rows(smollm2_dir: Path, tmp_path: Path) -> None:
    files = SHARED_DATA / "sst-2" / "poison" / "addsent"
    common = ["--train", str(files / "train-mixed-0.1.csv"), "--dev", str(files / "dev-clean.csv")]
    common += ["--test-clean", str(files / "test-clean.csv"), "--test-poison", str(files / "test-poison.csv")]
    common += ["--model", str(smollm2_dir), "--load-in-4bit", "--quiet"]
    small = ["max_train_rows=32", "max_dev_rows=16", "max_test_rows=16", "num_train_epochs=1"]
    args = ["train", "--method", "lora-llama", "--output-dir", str(tmp_path / "cls")] + common
    assert main(args + [item for pair in (("--set", s) for s in small) for item in pair]) == 0
    small_instruct = ["max_train_rows=32", "max_test_rows=16", "reference_split_size=16"]
    args = ["instruct", "--method", "musclelora", "--output-dir", str(tmp_path / "sft")] + common
    assert main(args + [item for pair in (("--set", s) for s in small_instruct) for item in pair]) == 0
    metrics = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert metrics["clean_rows"] == 16 and metrics["load_in_4bit"]


def test_loading_a_directory_that_is_not_an_instruction_cell_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a saved instruction cell"):
        load_instruct_cell(tmp_path)


def _row_filter_settings(**overrides: object) -> InstructSettings:
    """A tiny instruction cell whose row filter probes 1 and 2 steps, calibrated on 8 trusted dev prompts."""
    return apply_overrides(
        InstructSettings(r=4, per_device_train_batch_size=4, max_length=48),
        {"reference_split_size": 8, "row_filter_probe_steps": [1, 2], "row_filter_max_clean_drop": 0.3} | overrides,
    )


def _scored_cell(
    method: str, settings: InstructSettings, model_dir: Path, attack_files: dict[str, Path], output_dir: Path
) -> dict:
    """One tiny instruction cell of `method`, trained and scored on both test sets."""
    return train_instruct(
        method,
        attack_files["train"],
        attack_files["dev"],
        output_dir,
        model_dir,
        settings=settings,
        test_clean=attack_files["test_clean"],
        test_poison=attack_files["test_poison"],
        progress=False,
    )


def test_instruct_fit_gap_filters_rows_by_their_completion_loss_and_saves_the_decisions(
    tiny_llama_dir: Path, attack_files: dict[str, Path], tmp_path: Path
) -> None:
    settings = _row_filter_settings()
    result = _scored_cell("fit-gap", settings, tiny_llama_dir, attack_files, tmp_path / "cell")
    report = result["row_filter"]
    rows = result["data"]["train"]["rows"]
    assert result["gradient_alignment"] is False and report["rows"] == rows
    assert report["kept"] + report["fit_early"] + report["contradicted"] == rows
    decisions = json.loads((tmp_path / "cell" / "row_filter.json").read_text())
    assert len(decisions["rows"]) == rows and all(len(row["losses"]) == 2 for row in decisions["rows"])
    assert all(math.isfinite(loss) for row in decisions["rows"] for loss in row["losses"])
    assert result["steps"] == math.ceil(report["kept"] / 4)  # one epoch over the kept rows only


def test_instruct_recommended_is_the_musclelora_recipe() -> None:
    from peft_musclelora.benchmark.instruct import INSTRUCT_ALIASES, _sft_trainer

    assert INSTRUCT_ALIASES["recommended"] == "musclelora"
    assert _sft_trainer("musclelora", InstructSettings())[2]["gradient_alignment"] is True


def test_instruct_fit_gap_unlearn_leaves_the_cap_to_the_library_chance_among_the_label_words() -> None:
    from peft_musclelora.benchmark.instruct import _sft_trainer

    kwargs = _sft_trainer("fit-gap-unlearn", instruct_settings("fit-gap-unlearn"))[2]
    assert kwargs["row_filter"] and kwargs["row_filter_unlearn"] and not kwargs["gradient_alignment"]
    assert kwargs["row_filter_unlearn_cap"] is None  # the phase takes ln K on the choice of answer
    chosen = instruct_settings("fit-gap-unlearn", {"row_filter_unlearn_cap": 1.5})
    assert _sft_trainer("fit-gap-unlearn", chosen)[2]["row_filter_unlearn_cap"] == 1.5  # a set cap is kept
    assert not _sft_trainer("fit-gap", instruct_settings("fit-gap"))[2]["row_filter_unlearn"]


@pytest.mark.parametrize("method", [name for name in INSTRUCT_METHODS if name.startswith("fit-gap")])
def test_instruct_settings_of_a_row_filter_method_are_the_method_s_row_filter(method: str) -> None:
    from peft_musclelora.benchmark.instruct import _with_method_row_filter

    own = instruct_settings(method)
    assert own.row_filter.row_filter
    assert _with_method_row_filter(method, InstructSettings()) == own  # Python's InstructSettings() runs the same


def test_instruct_settings_check_a_change_against_the_method_not_the_library_defaults() -> None:
    from peft_musclelora.benchmark.instruct import _sft_trainer

    changes = parse_fields([split_item("row_filter_unlearn_trigger_z=4")], InstructSettings)
    with pytest.raises(ValueError, match="row_filter_unlearn_trigger_z"):  # no target reads the trigger by default
        apply_overrides(InstructSettings(), changes)
    kwargs = _sft_trainer("fit-gap-inserted", instruct_settings("fit-gap-inserted", changes))[2]
    assert kwargs["row_filter_unlearn_trigger_z"] == 4.0
    assert kwargs["row_filter_unlearn_target"] == "chance_inserted"


def test_instruct_settings_keep_a_change_back_to_a_library_default() -> None:
    from peft_musclelora.benchmark.instruct import _sft_trainer

    kwargs = _sft_trainer("fit-gap-unlearn", instruct_settings("fit-gap-unlearn", {"row_filter_unlearn": False}))[2]
    assert kwargs["row_filter"] and not kwargs["row_filter_unlearn"]


def test_instruct_settings_refuse_a_row_filter_that_contradicts_the_method() -> None:
    from peft_musclelora.benchmark.instruct import _sft_trainer

    with pytest.raises(ValueError, match="row_filter=False: method 'fit-gap'"):
        instruct_settings("fit-gap", {"row_filter": False})
    with pytest.raises(ValueError, match="row_filter=True: method 'lora' does not filter rows"):
        _sft_trainer("lora", instruct_settings("lora", {"row_filter": True}))
    with pytest.raises(ValueError, match="method must be one of"):
        instruct_settings("fit-gapp")


def test_cli_instruct_takes_a_setting_the_method_makes_valid(
    monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path, attack_files: dict[str, Path]
) -> None:
    import peft_musclelora.benchmark.commands.instruct as command

    seen = {}

    def record(method, *args, settings, **kwargs):
        seen.update(method=method, settings=settings)
        return {"adapter_dir": "unused"}

    monkeypatch.setattr(command, "train_instruct", record)
    args = ["instruct", "--method", "fit-gap-inserted", "--train", str(attack_files["train"])]
    args += ["--dev", str(attack_files["dev"]), "--model", str(tiny_llama_dir)]
    assert main(args + ["--set", "row_filter_unlearn_trigger_z=4"]) == 0
    assert seen["settings"].row_filter.row_filter_unlearn_trigger_z == 4.0
    assert seen["settings"].row_filter.row_filter_unlearn_target == "chance_inserted"
    assert main(["instruct", "--method", "lora"] + args[3:] + ["--set", "row_filter_unlearn_trigger_z=4"]) == 1


def test_instruct_fit_gap_inserted_is_fit_gap_evidence_with_the_trigger_inserted() -> None:
    from peft_musclelora.benchmark.instruct import _sft_trainer

    inserted, evidence = (
        _sft_trainer(name, instruct_settings(name))[2] for name in ("fit-gap-inserted", "fit-gap-evidence")
    )
    encoder = get_typed_preset("fit-gap-inserted").training.row_filter
    assert inserted["row_filter_unlearn_target"] == "chance_inserted" == encoder.row_filter_unlearn_target
    # the encoder preset's loss guard reads class log-probabilities; on answer tokens the accuracy guard stays
    assert encoder.row_filter_unlearn_guard == "accuracy_and_loss"
    assert inserted["row_filter_unlearn_guard"] == "accuracy" == evidence["row_filter_unlearn_guard"]
    del inserted["row_filter_unlearn_target"], evidence["row_filter_unlearn_target"]
    assert inserted == evidence


def test_instruct_fit_gap_either_is_fit_gap_inserted_unlearning_only_at_the_plain_level() -> None:
    from peft_musclelora.benchmark.instruct import _sft_trainer

    either, inserted = (
        _sft_trainer(name, instruct_settings(name))[2] for name in ("fit-gap-either", "fit-gap-inserted")
    )
    encoder = get_typed_preset("fit-gap-either").training.row_filter
    assert either["row_filter_unlearn_significance"] == encoder.row_filter_unlearn_significance
    assert either["row_filter_unlearn_significance"] == either["row_filter_plain_significance"]
    assert inserted["row_filter_unlearn_significance"] > inserted["row_filter_plain_significance"]
    del either["row_filter_unlearn_significance"], inserted["row_filter_unlearn_significance"]
    assert either == inserted


def test_instruct_fit_gap_unlearn_runs_the_guarded_phase_on_the_completion_loss(
    tiny_llama_dir: Path, attack_files: dict[str, Path], tmp_path: Path
) -> None:
    settings = _row_filter_settings(
        row_filter_max_clean_drop=0.45,
        row_filter_unlearn_steps=2,
        row_filter_unlearn_eval_every=1,
        row_filter_unlearn_significance=None,
    )
    result = train_instruct(
        "fit-gap-unlearn",
        attack_files["train"],
        attack_files["dev"],
        tmp_path / "cell",
        tiny_llama_dir,
        settings=settings,
        progress=False,
    )
    phase = json.loads((tmp_path / "cell" / "row_filter.json").read_text())["unlearning"]
    assert result["method"] == "fit-gap-unlearn" and phase["isolated"] == result["row_filter"]["fit_early"]
    recorded = result["settings"]["row_filter"]  # the row filter that ran, the method's fields included
    assert recorded["row_filter"] and recorded["row_filter_unlearn"] and recorded["row_filter_unlearn_steps"] == 2
    assert phase["cap"] == pytest.approx(math.log(2)) and result["row_filter"]["unlearn_cap"] == phase["cap"]
    assert phase["isolated"] > 0 and [point["step"] for point in phase["guard"]] == [0, 1, 2]
    assert all(0.0 <= point["accuracy"] <= 1.0 for point in phase["guard"])


def test_instruct_fit_gap_poe_predicts_the_label_word_from_the_prompt_and_saves_the_response_classes(
    tiny_llama_dir: Path, attack_files: dict[str, Path], tmp_path: Path
) -> None:
    settings = _row_filter_settings()
    results = {
        method: train_instruct(
            method,
            attack_files["train"],
            attack_files["dev"],
            tmp_path / method,
            tiny_llama_dir,
            settings=settings,
            progress=False,
        )
        for method in ("fit-gap-unlearn", "fit-gap-poe")
    }
    decisions = json.loads((tmp_path / "fit-gap-poe" / "row_filter.json").read_text())
    summary = decisions["summary"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_llama_dir)
    words = InstructTemplate().label_words
    answers = {tuple(tokenizer(word, add_special_tokens=False)["input_ids"]) for word in words}
    # Each class is one label word's answer (and whatever the template appends after it, such as end-of-sequence).
    classes = [tuple(cls) for cls in summary["response_classes"]]
    assert len(classes) == 2
    assert all(any(cls[: len(answer)] == answer for answer in answers) for cls in classes)
    assert all(any(cls[: len(answer)] == answer for cls in classes) for answer in answers)
    assert summary["shallow_expert"] is True and summary["shallow_expert_weight"] == 6.0
    assert all(len(row["shallow_log_probs"]) == 2 and len(row["losses"]) == 3 for row in decisions["rows"])
    assert results["fit-gap-poe"]["method"] == "fit-gap-poe"
    assert results["fit-gap-poe"]["row_filter"]["rows"] == results["fit-gap-unlearn"]["row_filter"]["rows"]
    # The extra (shallow) probe step is calibrated like the others: it may flag rows the adapter's probes did not.
    assert results["fit-gap-poe"]["row_filter"]["kept"] <= results["fit-gap-poe"]["row_filter"]["rows"]


def test_instruct_fit_gap_gated_reads_the_trusted_teacher_on_the_answer_tokens_and_saves_its_predictions(
    tiny_llama_dir: Path, attack_files: dict[str, Path], tmp_path: Path
) -> None:
    from peft_musclelora.benchmark.instruct import _sft_trainer

    gated = get_typed_preset("fit-gap-gated").training.row_filter
    kwargs = _sft_trainer("fit-gap-gated", instruct_settings("fit-gap-gated"))[2]
    for name in ("row_filter_shallow_expert_weight", "row_filter_teacher_mix", "row_filter_teacher_mix_gate"):
        assert kwargs[name] == getattr(gated, name)  # the encoder preset's settings, declared once
    assert kwargs["row_filter_teacher_steps"] == gated.row_filter_teacher_steps and kwargs["row_filter_unlearn"]
    # A --set of a method setting is kept; 4 epochs of at least 9 kept rows reach the first log (every 10 steps).
    settings = _row_filter_settings(row_filter_teacher_steps=3, num_train_epochs=4)
    result = _scored_cell("fit-gap-gated", settings, tiny_llama_dir, attack_files, tmp_path / "cell")
    decisions = json.loads((tmp_path / "cell" / "row_filter.json").read_text())
    summary = decisions["summary"]
    assert result["method"] == "fit-gap-gated" and summary["teacher_steps"] == 3
    assert summary["teacher_mix"] == 0.5 and summary["teacher_mix_gate"] == "model_contradicts"
    assert len(summary["response_classes"]) == 2 and 0.0 <= summary["teacher_label_agreement"] <= 1.0
    teacher = torch.tensor([row["teacher_log_probs"] for row in decisions["rows"]], dtype=torch.float64)
    assert teacher.shape == (result["data"]["train"]["rows"], 2)
    assert torch.allclose(teacher.exp().sum(dim=-1), torch.ones(len(teacher), dtype=torch.float64))
    history = json.loads((tmp_path / "cell" / "log_history.json").read_text())
    gates = [entry["row_filter/teacher_gate"] for entry in history if "row_filter/teacher_gate" in entry]
    assert gates and all(0.0 <= gate <= 1.0 for gate in gates)
    assert 0.0 <= result["cacc"] <= 1.0 and 0.0 <= result["asr"] <= 1.0


def test_instruct_fit_gap_evidence_is_fit_gap_gated_training_plainly_on_strong_evidence(
    tiny_llama_dir: Path, attack_files: dict[str, Path], tmp_path: Path
) -> None:
    from peft_musclelora.benchmark.instruct import _sft_trainer

    gated = _sft_trainer("fit-gap-gated", instruct_settings("fit-gap-gated"))[2]
    evidence = _sft_trainer("fit-gap-evidence", instruct_settings("fit-gap-evidence"))[2]
    assert evidence == gated | {"row_filter_plain_significance": 1e-4}  # the encoder preset's level, declared once
    # Evidence at any level (the phase always runs): the answer tokens train on their labels alone.
    # A --set of the level is validated on its own, so it names what it needs.
    needs = {"row_filter": True, "row_filter_unlearn": True}
    needs |= {"row_filter_shallow_probe": "ngram", "row_filter_shallow_expert": True}
    settings = _row_filter_settings(
        row_filter_unlearn_significance=None,
        row_filter_plain_significance=0.999,
        row_filter_teacher_steps=3,
        num_train_epochs=4,  # 4 epochs of at least 9 kept rows reach the first log (every 10 steps)
        **needs,
    )
    result = _scored_cell("fit-gap-evidence", settings, tiny_llama_dir, attack_files, tmp_path / "cell")
    decisions = json.loads((tmp_path / "cell" / "row_filter.json").read_text())
    assert decisions["plain_training"]["plain"] and result["row_filter"]["plain_training"] is True
    history = json.loads((tmp_path / "cell" / "log_history.json").read_text())
    assert history[0]["row_filter/plain_training"] == 1.0
    assert not any("row_filter/teacher_gate" in entry for entry in history)  # no teacher in the loss
    assert result["method"] == "fit-gap-evidence" and 0.0 <= result["cacc"] <= 1.0
