"""Specification of the method presets: contents, printing, `--set` overrides and the arguments they build."""

from __future__ import annotations

import dataclasses
import json

import pytest

from peft_musclelora.benchmark.cli import main
from peft_musclelora.benchmark.overrides import parse_set_items
from peft_musclelora.benchmark.presets import PRESETS
from peft_musclelora.benchmark.presets import get_preset as get_typed_preset
from peft_musclelora.benchmark.settings import MethodPreset
from peft_musclelora.benchmark.spec import resolve_cell
from peft_musclelora.gradient_alignment import GradientAlignmentArguments
from peft_musclelora.row_filter import RowFilterArguments


def get_preset(name: str, items: list[str] | None = None):
    """The preset with `--set` items, parsed as the CLI parses them."""
    return get_typed_preset(name, parse_set_items(items).common)


def cell_settings(method: str, items: list[str]) -> dict:
    """The settings that identify a bench cell of `method` under `--set` items."""
    return resolve_cell(method, parse_set_items(items)).settings()


def test_the_encoder_presets_exist_with_the_measured_defaults() -> None:
    encoder = ["full", "lora", "mslr", "musclelora", "ga-lora", "ga-lora-tuned"]
    row_filters = [
        "fit-gap",
        "fit-gap-unlearn",
        "fit-gap-poe",
        "fit-gap-teacher",
        "fit-gap-gated",
        "fit-gap-gated-refit",
        "fit-gap-evidence",
        "fit-gap-inserted",
        "fit-gap-either",
    ]
    assert list(PRESETS) == encoder + row_filters + ["recommended", "lora-llama", "musclelora-llama"]
    for preset in (PRESETS[name] for name in [*encoder, *row_filters, "recommended"]):
        assert preset.training.max_length == 64 and preset.training.per_device_train_batch_size == 32
        assert preset.training.num_train_epochs == 3 and preset.description
    assert PRESETS["lora"].training.learning_rate == 2e-4


def test_reference_choices_freeze_the_head_and_lora_trains_it() -> None:
    assert not PRESETS["lora"].adapter.freeze_head and not PRESETS["ga-lora-tuned"].adapter.freeze_head
    assert all(PRESETS[name].adapter.freeze_head for name in ("mslr", "musclelora", "ga-lora"))


def test_musclelora_is_the_published_recipe() -> None:
    preset = PRESETS["musclelora"]
    assert (preset.adapter.r, preset.adapter.lora_alpha, preset.adapter.target_modules) == (8, 32, None)
    assert preset.adapter.head_pattern == "pooler.dense" and preset.adapter.head_scales == list(range(1, 10))
    assert (preset.adapter.head_r, preset.adapter.head_alpha, preset.adapter.head_init) == (1, 6, "kaiming")
    assert preset.training.ga_kwargs() == {
        "gradient_alignment": True,
        "reference_split_size": 96,
        "reference_stratify": False,  # the published split is seeded random
        "reference_batch_size": None,
        "ga_warmup_epochs": 1.0,
        "max_raw_grad_ratio": 0.1,
        "min_ref_loss": 0.4,
        "min_ref_grad_norm": 5e-7,
        "ga_every_n_steps": 1,
        "reference_dropout": False,  # the library default; `--set reference_dropout=true` is the reference's pass
        "ga_subspace_size": 1,
        "ga_params": None,
        "ga_fallback": "raw",
    }


def test_tuned_recipe_aligns_every_step_on_400_references() -> None:
    kwargs = PRESETS["ga-lora-tuned"].training.ga_kwargs()
    assert kwargs["reference_split_size"] == 400
    assert (kwargs["ga_warmup_epochs"], kwargs["max_raw_grad_ratio"], kwargs["min_ref_loss"]) == (0.0, 0.0, 0.0)


def test_fail_closed_fallback_is_the_trainers_own_field() -> None:
    from peft_musclelora.gradient_alignment import FALLBACKS

    # the preset holds the trainer's GradientAlignmentArguments: its choices are the trainer's, not a restatement
    assert all(type(preset.training.ga) is GradientAlignmentArguments for preset in PRESETS.values())
    assert [get_preset("lora", [f"ga_fallback={choice}"]).training.ga.ga_fallback for choice in FALLBACKS] == list(
        FALLBACKS
    )
    preset = get_preset("ga-lora-tuned", ["ga_fallback=zero"])
    assert preset.training.ga_kwargs()["ga_fallback"] == "zero"
    with pytest.raises(ValueError, match="ga_fallback"):
        get_preset("ga-lora-tuned", ["ga_fallback=skip"])


def test_ga_presets_build_ga_arguments_and_the_others_do_not() -> None:
    for name, preset in PRESETS.items():
        kwargs = preset.training.training_arguments_kwargs("out", seed=3)
        assert (
            kwargs["seed"] == 3 and kwargs["metric_for_best_model"] == "accuracy" and kwargs["load_best_model_at_end"]
        )
        assert kwargs.get("gradient_alignment", False) == (
            name in ("musclelora", "ga-lora", "ga-lora-tuned", "musclelora-llama")
        )


def test_non_ga_arguments_are_valid_transformers_training_arguments(tmp_path) -> None:
    from transformers import TrainingArguments

    args = TrainingArguments(**PRESETS["lora"].training.training_arguments_kwargs(str(tmp_path), seed=0))
    assert args.learning_rate == 2e-4 and args.eval_strategy == "epoch"


class TestOverrides:
    def test_values_are_parsed_by_field_type(self) -> None:
        preset = get_preset(
            "musclelora",
            [
                "learning_rate=1e-4",
                "num_train_epochs=2",
                "freeze_head=false",
                "head_scales=1,2,4",
                'target_modules=["query", "key"]',
                "reference_batch_size=16",
                "adapter.r=4",
                "max_train_rows=none",
                "ga_warmup_epochs=0",
            ],
        )
        assert preset.training.learning_rate == 1e-4 and preset.training.num_train_epochs == 2.0
        assert preset.adapter.freeze_head is False and preset.adapter.head_scales == [1.0, 2.0, 4.0]
        assert preset.adapter.target_modules == ["query", "key"] and preset.adapter.r == 4
        assert preset.training.ga.reference_batch_size == 16 and preset.training.max_train_rows is None
        assert PRESETS["musclelora"].adapter.r == 8  # the registry is not mutated

    @pytest.mark.parametrize(
        ("item", "message"),
        [
            ("learning_rat=1", "unknown key 'learning_rat' \\(did you mean 'learning_rate'\\?\\)"),
            ("training.r=1", "unknown key 'training.r'"),
            ("r", "expected key=value, got 'r'"),
            ("r=four", "--set r='four': expected int"),
            ("freeze_head=maybe", "expected true or false"),
            ("kind=qlora", "expected one of \\['full', 'lora', 'musclelora'\\]"),
            ("head_scales=[]", "expected a non-empty list"),
            ("head_init=xavier", "head_init must be one of"),
            ("max_length=0", "max_length must be >= 1"),
        ],
    )
    def test_errors(self, item: str, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            get_preset("musclelora", [item])

    def test_unknown_method(self) -> None:
        with pytest.raises(ValueError, match="unknown method 'qlora'; available: full, lora"):
            get_preset("qlora")


class TestPrinting:
    def test_format_lists_every_settable_key(self) -> None:
        text = PRESETS["mslr"].format()
        assert text.startswith("mslr: ") and '    head_pattern = "pooler.dense"' in text
        assert "    gradient_alignment = false" in text

    def test_presets_command_prints_all_and_json(self, capsys) -> None:
        assert main(["presets"]) == 0
        out = capsys.readouterr().out
        assert all(f"{name}: " in out for name in PRESETS)
        assert main(["presets", "lora", "--json", "--set", "r=2"]) == 0
        assert json.loads(capsys.readouterr().out)["lora"]["adapter"]["r"] == 2

    def test_print_preset_on_train_applies_overrides(self, capsys) -> None:
        code = main(["train", "--method", "lora", "--train", "x", "--dev", "y", "--set", "r=2", "--print-preset"])
        assert code == 0 and "    r = 2" in capsys.readouterr().out

    def test_bad_override_exits_non_zero_with_one_line(self, capsys) -> None:
        assert main(["presets", "--set", "nope=1"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("musclelora presets: error: --set: unknown key 'nope'") and "\n" not in err


def test_a_cell_is_identified_by_its_resolved_settings_not_by_how_they_were_spelled() -> None:
    reordered = cell_settings("lora", ["learning_rate=0.001", "r=4"])
    assert cell_settings("lora", ["r=4", "learning_rate=1e-3"]) == reordered
    assert cell_settings("lora", ["r=8"]) == cell_settings("lora", []), "a default written out changes nothing"
    assert cell_settings("lora", ["num_train_epochs=2"]) != cell_settings("lora", [])
    # clean-only trains for clean_only_epochs, so the others' epoch count does not change it; its own count does
    assert cell_settings("clean-only", ["num_train_epochs=2"]) == cell_settings("clean-only", [])
    assert cell_settings("clean-only", ["clean_only_epochs=5"]) != cell_settings("clean-only", [])
    assert get_preset("lora").training.num_train_epochs == 3, "resolving clean-only leaves the lora preset alone"
    # a defense's own options change its cell, another defense's do not
    assert cell_settings("bki", ["onion.frr=0.1"]) == cell_settings("bki", [])
    assert cell_settings("bki", ["bki.num_keywords=4"]) != cell_settings("bki", [])
    with pytest.raises(ValueError, match="unknown"):
        cell_settings("lora", ["no_such_field=1"])


def test_an_override_can_name_the_one_method_it_is_for() -> None:
    from peft_musclelora.benchmark.spec import check_methods

    items = ["learning_rate=1e-3", "full.learning_rate=5e-5", "onion.frr=0.1"]
    parsed = parse_set_items(items)
    full, lora, onion = (resolve_cell(method, parsed) for method in ("full", "lora", "onion"))
    assert (full.overrides, full.defense) == ({"learning_rate": 5e-5}, {}), "the method's own item wins"
    assert (lora.overrides, lora.defense) == ({"learning_rate": 1e-3}, {})
    assert (onion.overrides, onion.defense) == ({"learning_rate": 1e-3}, {"frr": 0.1})
    assert full.items == ("learning_rate=1e-3", "full.learning_rate=5e-5")
    assert cell_settings("full", items)["preset"]["training"]["learning_rate"] == 5e-5
    assert cell_settings("lora", items)["preset"]["training"]["learning_rate"] == 1e-3
    # a defense builds on the undefended lora cell, so lora's own overrides change the defense's cell too
    assert cell_settings("strip", ["lora.r=2"]) != cell_settings("strip", [])
    with pytest.raises(ValueError, match="no_such_field"):
        check_methods(["lora"], parse_set_items(["full.no_such_field=1"]))  # checked even when another method runs
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        check_methods(["lora"], parse_set_items(["full.max_length=0"]))  # values too, before anything trains


def test_fit_gap_is_lora_on_the_rows_its_row_filter_keeps() -> None:
    fit_gap, lora = PRESETS["fit-gap"], PRESETS["lora"]
    assert fit_gap.adapter == lora.adapter and not fit_gap.training.gradient_alignment
    kwargs = fit_gap.training.row_filter_kwargs()
    assert kwargs["row_filter"] is True and kwargs["row_filter_probe_steps"] == [16, 32, 64]
    assert (kwargs["row_filter_folds"], kwargs["row_filter_max_clean_drop"]) == (2, 0.04)
    assert kwargs["row_filter_probe_learning_rate"] == 1e-3
    assert (kwargs["gradient_alignment"], kwargs["reference_split_size"]) == (False, 400)
    # every field of the library's RowFilterArguments goes through, whatever fields it gains
    library = dataclasses.asdict(RowFilterArguments(row_filter=True, row_filter_probe_learning_rate=1e-3))
    split = {"reference_split_size": 400, "reference_stratify": False}  # the trusted split GA would make
    assert kwargs == {**library, "gradient_alignment": False, **split}
    assert lora.training.row_filter_kwargs() == {}


def test_fit_gap_unlearn_is_fit_gap_plus_the_library_unlearning_phase_at_its_defaults() -> None:
    fit_gap, unlearn = PRESETS["fit-gap"], PRESETS["fit-gap-unlearn"]
    assert unlearn.adapter == fit_gap.adapter
    assert unlearn.training.row_filter == dataclasses.replace(fit_gap.training.row_filter, row_filter_unlearn=True)
    assert dataclasses.replace(unlearn.training, row_filter=fit_gap.training.row_filter) == fit_gap.training
    defaults = RowFilterArguments()
    phase = unlearn.training.row_filter
    assert (phase.row_filter_unlearn_steps, phase.row_filter_unlearn_eval_every) == (100, 10)
    assert phase.row_filter_unlearn_max_guard_drop == defaults.row_filter_unlearn_max_guard_drop == 0.01
    assert phase.row_filter_unlearn_cap is None and phase.row_filter_unlearn_learning_rate is None


def test_row_filter_fields_are_the_trainers_own_names() -> None:
    from peft_musclelora.benchmark.settings import TrainingSettings, settable_fields

    assert type(TrainingSettings().row_filter) is RowFilterArguments and TrainingSettings().row_filter == (
        RowFilterArguments()
    )
    settable = {name for name, (path, _) in settable_fields(TrainingSettings).items() if path[0] == "row_filter"}
    assert settable == {f.name for f in dataclasses.fields(RowFilterArguments)}, "each one settable with --set"
    folds = get_preset("fit-gap", ["row_filter_folds=3", "row_filter_probe_steps=8,4"]).training.row_filter
    assert (folds.row_filter_folds, folds.row_filter_probe_steps) == (3, [4, 8])


def test_fit_gap_arguments_build_the_defended_trainers_arguments(tmp_path) -> None:
    from peft_musclelora import MuScleLoraTrainingArguments

    kwargs = PRESETS["fit-gap"].training.training_arguments_kwargs(str(tmp_path), seed=0)
    args = MuScleLoraTrainingArguments(**kwargs)
    assert args.row_filter and not args.gradient_alignment and args.reference_split_size == 400
    with pytest.raises(ValueError, match="row_filter_max_clean_drop"):
        MuScleLoraTrainingArguments(**{**kwargs, "row_filter_max_clean_drop": 0.7})


def test_fit_gap_poe_is_fit_gap_unlearn_plus_the_shallow_probe_and_a_sharpened_shallow_expert() -> None:
    unlearn, poe = PRESETS["fit-gap-unlearn"], PRESETS["fit-gap-poe"]
    assert poe.adapter == unlearn.adapter
    shallow = {
        "row_filter_shallow_probe": "ngram",
        "row_filter_shallow_expert": True,
        "row_filter_shallow_expert_weight": 6.0,
    }
    assert poe.training == dataclasses.replace(
        unlearn.training, row_filter=dataclasses.replace(unlearn.training.row_filter, **shallow)
    )
    assert poe.training.training_arguments_kwargs("out", seed=0).items() >= shallow.items()


def test_fit_gap_teacher_is_fit_gap_poe_at_weight_4_with_the_trusted_teacher() -> None:
    poe, teacher = PRESETS["fit-gap-poe"], PRESETS["fit-gap-teacher"]
    assert teacher.adapter == poe.adapter
    changes = {"row_filter_shallow_expert_weight": 4.0, "row_filter_teacher_mix": 0.5}
    assert teacher.training == dataclasses.replace(
        poe.training, row_filter=dataclasses.replace(poe.training.row_filter, **changes)
    )
    kwargs = teacher.training.training_arguments_kwargs("out", seed=0)
    assert kwargs.items() >= changes.items() and kwargs["row_filter_teacher_steps"] == 144
    assert not kwargs["row_filter_refit_bias"]


def _assert_row_filter_preset_is(name: str, base: str, change: dict) -> MethodPreset:
    """Assert that preset `name` is preset `base` with the row-filter fields `change` and the same adapter; return
    it."""
    preset, base_preset = PRESETS[name], PRESETS[base]
    assert preset.adapter == base_preset.adapter
    assert preset.training == dataclasses.replace(
        base_preset.training, row_filter=dataclasses.replace(base_preset.training.row_filter, **change)
    )
    return preset


def test_fit_gap_gated_is_fit_gap_teacher_with_the_teachers_share_where_the_model_contradicts_the_label() -> None:
    gated = _assert_row_filter_preset_is(
        "fit-gap-gated", "fit-gap-teacher", {"row_filter_teacher_mix_gate": "model_contradicts"}
    )
    # The settings session 16's cells ran with: fit-gap-unlearn and these `--set` items (benchmarks/fit_gap_cell.sh).
    items = [
        "row_filter_shallow_probe=ngram", "row_filter_shallow_expert=true", "row_filter_shallow_expert_weight=4",
        "row_filter_teacher_mix=0.5", "row_filter_teacher_mix_gate=model_contradicts",
    ]  # fmt: skip
    assert get_preset("fit-gap-unlearn", items).training == gated.training


def test_fit_gap_gated_refit_is_fit_gap_gated_with_the_bias_refit_after_an_unlearning_phase_that_ran() -> None:
    refit = _assert_row_filter_preset_is(
        "fit-gap-gated-refit", "fit-gap-gated", {"row_filter_unlearn_refit_bias": True}
    )
    assert refit.training.row_filter.row_filter_refit_bias is False  # a run whose phase was skipped keeps its bias


def test_fit_gap_evidence_is_fit_gap_gated_refit_training_plainly_on_evidence_stricter_than_the_phases() -> None:
    evidence = _assert_row_filter_preset_is(
        "fit-gap-evidence", "fit-gap-gated-refit", {"row_filter_plain_significance": 1e-4}
    )
    assert evidence.training.row_filter.row_filter_unlearn_significance == 0.01  # the phase runs whenever it is plain


def test_fit_gap_inserted_is_fit_gap_evidence_inserting_the_trigger_beside_the_push_to_chance_in_chunks() -> None:
    inserted = _assert_row_filter_preset_is(
        "fit-gap-inserted",
        "fit-gap-evidence",
        {
            "row_filter_unlearn_target": "chance_inserted",
            # a state is kept only if the trusted rows' label loss has not risen either (paired test at 1 %)
            "row_filter_unlearn_guard": "accuracy_and_loss",
            # the phase's and the teacher's batches in length-sorted chunks: the same losses, less padding
            "row_filter_unlearn_chunk_rows": 8,
            "row_filter_teacher_chunk_rows": 8,
        },
    )
    assert inserted.training.row_filter.row_filter_unlearn_insertion_target == "unchanged"  # the row as it is


def test_fit_gap_either_is_fit_gap_inserted_unlearning_only_where_the_kept_rows_trained_plainly() -> None:
    either = _assert_row_filter_preset_is(
        "fit-gap-either", "fit-gap-inserted", {"row_filter_unlearn_significance": 1e-4}
    )
    row_filter = either.training.row_filter
    # one level for both: strong evidence gets plain training and the phase, anything less the expert and teacher
    assert row_filter.row_filter_unlearn_significance == row_filter.row_filter_plain_significance


def test_on_evidence_between_the_two_levels_fit_gap_inserted_unlearns_after_the_expert_and_fit_gap_either_does_not():
    from peft_musclelora.row_filter import isolation_evidence, plain_training

    between = {"rows": 6920, "fit_early": 311, "reference_low_flagged": 0.016, "reference_rows": 400}  # z 2.76
    for name, unlearns in (("fit-gap-inserted", True), ("fit-gap-either", False)):
        args = PRESETS[name].training.row_filter
        assert plain_training(between, args)["plain"] is False  # the expert and the teacher train the kept rows
        assert isolation_evidence(between, args.row_filter_unlearn_significance)["passed"] is unlearns


def test_recommended_is_fit_gap_either_under_its_own_name() -> None:
    recommended, either = PRESETS["recommended"], PRESETS["fit-gap-either"]
    assert (recommended.adapter, recommended.training) == (either.adapter, either.training)
    assert recommended.name == "recommended" and "fit-gap-either" in recommended.description


def test_a_field_the_row_filter_gains_reaches_the_trainer_without_a_benchmark_edit() -> None:
    from peft_musclelora.benchmark.settings import TrainingSettings

    @dataclasses.dataclass
    class GrownRowFilterArguments(RowFilterArguments):  # as RowFilterArguments will look with one more field
        row_filter_unlearn_steps: int = 0

    training = TrainingSettings(row_filter=GrownRowFilterArguments(row_filter=True, row_filter_unlearn_steps=3))
    assert training.row_filter_kwargs()["row_filter_unlearn_steps"] == 3
    assert training.training_arguments_kwargs("out", seed=0)["row_filter_unlearn_steps"] == 3
