"""Unlearning the isolated rows (`row_filter_unlearn`): the guard rule, what the phase changes, and what it writes."""

from __future__ import annotations

import json
import math
import types

import datasets
import pytest
import torch

from peft_musclelora import MuScleLoraTrainer
from peft_musclelora.answer_classes import answer_class_log_probs, answer_tokens
from peft_musclelora.bias_refit import output_bias, refit_output_bias
from peft_musclelora.row_filter import (
    ROW_FILTER_FILE,
    SHALLOW_PRIOR_COLUMN,
    TEACHER_COLUMN,
    UNLEARN_GUARDS,
    RowFilterArguments,
    isolation_evidence,
    per_row_loss,
    subset_rows,
)
from peft_musclelora.unlearning import (
    GUARDS,
    _default_cap,
    apply_insertions,
    correct_and_total,
    draw_insertions,
    guard_accuracy,
    insert_runs,
    placebo_tokens,
    refit_guard_accuracy,
    run_unlearning,
    token_level_rows,
    trigger_insertion_loss,
    trigger_neutral_loss,
    trigger_runs,
    trigger_tokens,
    with_placebos,
)

from .ga_helpers import VOCAB, cue_answer_sft_trainer, tiny_llama, token_dataset, trainable_state
from .test_row_filter import _trainer


def test_accuracy_counts_rows_for_classification_and_labelled_next_tokens_for_a_causal_lm():
    assert correct_and_total(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])) == (1, 2)
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = logits[0, 1, 3] = 1.0  # predicts token 2 after position 0, token 3 after position 1
    assert correct_and_total(logits, torch.tensor([[-100, 2, 1]])) == (1, 2)
    assert correct_and_total(logits, torch.tensor([[-100, -100, 3]])) == (1, 1)


def test_the_default_cap_is_chance_among_the_classes_and_generation_must_set_one():
    assert _default_cap(torch.zeros(4, 3)) == pytest.approx(math.log(3))
    with pytest.raises(ValueError, match="set row_filter_unlearn_cap"):
        _default_cap(torch.zeros(4, 5, 10))


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"row_filter_unlearn": True}, ValueError, "set row_filter=True"),
        ({"row_filter_unlearn": "yes"}, TypeError, "`row_filter_unlearn`.*'yes'"),
        ({"row_filter_unlearn_steps": 0}, ValueError, "`row_filter_unlearn_steps`.*0"),
        ({"row_filter_unlearn_steps": 2.5}, TypeError, "`row_filter_unlearn_steps`.*2.5"),
        ({"row_filter_unlearn_eval_every": 0}, ValueError, "`row_filter_unlearn_eval_every`.*0"),
        ({"row_filter_unlearn_cap": -1.0}, ValueError, "`row_filter_unlearn_cap`.*-1.0"),
        ({"row_filter_unlearn_learning_rate": float("nan")}, TypeError, "`row_filter_unlearn_learning_rate`.*nan"),
        ({"row_filter_unlearn_max_guard_drop": 1.0}, ValueError, "`row_filter_unlearn_max_guard_drop`.*1.0"),
        ({"row_filter_unlearn_significance": 0.0}, ValueError, "`row_filter_unlearn_significance`.*0.0"),
        ({"row_filter_unlearn_significance": "1%"}, TypeError, "`row_filter_unlearn_significance`.*'1%'"),
        ({"row_filter_unlearn_refit_bias": 1}, TypeError, "`row_filter_unlearn_refit_bias`.*1"),
        ({"row_filter": True, "row_filter_unlearn_refit_bias": True}, ValueError, "set row_filter_unlearn=True"),
        ({"row_filter_unlearn_target": "flip"}, ValueError, "`row_filter_unlearn_target` must be one of .*'flip'"),
        ({"row_filter_unlearn_target": None}, TypeError, "`row_filter_unlearn_target` must be one of .*None"),
        ({"row_filter": True, "row_filter_unlearn_target": "trigger_neutral"}, ValueError, "row_filter_unlearn=True"),
        (
            {"row_filter": True, "row_filter_unlearn": True, "row_filter_unlearn_target": "trigger_neutral"}
            | {"row_filter_unlearn_cap": 1.0},
            ValueError,
            r"`row_filter_unlearn_cap` \(1.0\).*'trigger_neutral' has no cap",
        ),
        ({"row_filter": True, "row_filter_unlearn_target": "trigger_inserted"}, ValueError, "row_filter_unlearn=True"),
        (
            {"row_filter": True, "row_filter_unlearn": True, "row_filter_unlearn_target": "trigger_inserted"}
            | {"row_filter_unlearn_cap": 2.0},
            ValueError,
            r"`row_filter_unlearn_cap` \(2.0\).*'trigger_inserted' has no cap",
        ),
        (
            {"row_filter_unlearn_insertion_target": "noise"},
            ValueError,
            "`row_filter_unlearn_insertion_target` must be one of .*'noise'",
        ),
        (
            {"row_filter_unlearn_insertion_target": "placebo"},
            ValueError,
            r"`row_filter_unlearn_insertion_target` \('placebo'\).*'trigger_inserted'",
        ),
        ({"row_filter": True, "row_filter_unlearn_target": "chance_inserted"}, ValueError, "row_filter_unlearn=True"),
        (
            {"row_filter_unlearn_insertion_target": "placebo", "row_filter_unlearn_target": "trigger_neutral"}
            | {"row_filter": True, "row_filter_unlearn": True},
            ValueError,
            r"`row_filter_unlearn_insertion_target` \('placebo'\).*'trigger_inserted' or 'chance_inserted'",
        ),
        ({"row_filter_unlearn_trigger_z": 0}, ValueError, "`row_filter_unlearn_trigger_z` must be > 0, got 0"),
        ({"row_filter_unlearn_guard": "loss"}, ValueError, "`row_filter_unlearn_guard` must be one of .*'loss'"),
        ({"row_filter_unlearn_guard": None}, TypeError, "`row_filter_unlearn_guard` must be one of .*None"),
        (
            {"row_filter_unlearn_guard_significance": 1.0},
            ValueError,
            "`row_filter_unlearn_guard_significance` must be in \\(0, 1\\), got 1.0",
        ),
        (
            {"row_filter_unlearn_guard_significance": 0.05},
            ValueError,
            "`row_filter_unlearn_guard_significance` \\(0.05\\).*row_filter_unlearn_guard='accuracy_and_loss'",
        ),
        (
            {"row_filter": True, "row_filter_unlearn_guard": "refit_accuracy"},
            ValueError,
            "`row_filter_unlearn_guard='refit_accuracy'`.*set row_filter_unlearn=True",
        ),
        (
            {"row_filter": True, "row_filter_unlearn": True, "row_filter_unlearn_guard": "refit_accuracy"},
            ValueError,
            "`row_filter_unlearn_guard='refit_accuracy'`.*set row_filter_unlearn_refit_bias=True",
        ),
        (
            {"row_filter_unlearn_trigger_z": 5.0},
            ValueError,
            r"`row_filter_unlearn_trigger_z` \(5.0\).*'trigger_neutral'",
        ),
    ],
)
def test_invalid_unlearning_settings_name_the_field_and_the_value(overrides, error, match):
    with pytest.raises(error, match=match):
        RowFilterArguments(**overrides)


def _unlearning_trainer(tmp_path, **overrides):
    # No evidence test: the tiny set has no shortcut to find; these tests are about the phase itself.
    settings = {"row_filter_unlearn": True, "row_filter_unlearn_steps": 6, "row_filter_unlearn_eval_every": 2}
    settings["row_filter_unlearn_significance"] = None
    return _trainer(tmp_path, **{**settings, **overrides})


def test_the_refit_guard_measures_the_accuracy_the_bias_refit_would_hand_over(tmp_path):
    trainer = _unlearning_trainer(tmp_path / "run", row_filter_unlearn_steps=2)
    trainer.train()
    model, reference = trainer.model, trainer.reference_dataset
    with torch.no_grad():  # lean the model towards class 0, as a phase can: the refit takes the lean back out
        output_bias(model, 2)[1].add_(torch.tensor([3.0, -3.0]))
    measured, bias = refit_guard_accuracy(trainer, model, reference), output_bias(model, 2)[1].detach().clone()
    assert torch.equal(bias, output_bias(model, 2)[1])  # measuring leaves the model as it was
    refit_output_bias(trainer, reference)
    assert measured == pytest.approx(guard_accuracy(trainer, model, reference))
    assert measured >= 0.5  # the lean alone would put every trusted row in class 0


def test_a_phase_under_the_refit_guard_keeps_the_last_state_the_refit_accuracy_accepts(tmp_path):
    settings = {"row_filter_unlearn_guard": "refit_accuracy", "row_filter_unlearn_refit_bias": True}
    trainer = _unlearning_trainer(tmp_path, **settings)
    trainer.train()
    phase = trainer.row_filter_report["unlearning"]
    assert phase["guard_measure"] == "refit_accuracy" and [point["step"] for point in phase["guard"]] == [0, 2, 4, 6]
    floor = phase["guard_start"] - trainer.row_filter_args.row_filter_unlearn_max_guard_drop
    assert phase["chosen_step"] == max(point["step"] for point in phase["guard"] if point["accuracy"] >= floor)
    # the model handed over is the kept state after its refit: its plain accuracy is what the guard measured
    assert guard_accuracy(trainer, trainer.model, trainer.reference_dataset) == pytest.approx(phase["guard_end"])


def test_the_guard_measure_changes_which_state_is_kept_and_not_the_path(tmp_path):
    trainer = _unlearning_trainer(tmp_path, row_filter_unlearn_refit_bias=True)
    trainer.train()
    isolated, trained = subset_rows(trainer.train_dataset, list(range(16))), trainable_state(trainer.model)
    args = trainer.row_filter_args
    args.row_filter_unlearn_max_guard_drop = 0.99  # keep the last state: both measures then keep the same step
    ends = {}
    for measure in ("accuracy", "refit_accuracy", "accuracy_and_loss"):
        args.row_filter_unlearn_guard = measure
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if name in trained:
                    param.copy_(trained[name])
        run_unlearning(trainer, args, trainer.train_dataset, isolated, trainer.reference_dataset, 0, False)
        ends[measure] = trainable_state(trainer.model)
    for other in ("refit_accuracy", "accuracy_and_loss"):
        assert all(torch.equal(ends["accuracy"][name], ends[other][name]) for name in trained)
    # every guard draws alike from torch's generator (its loader's seed), so the phase's dropout masks are the same
    draws = []
    for guard in GUARDS.values():
        torch.manual_seed(0)
        guard.read(trainer, trainer.model, trainer.reference_dataset)
        draws.append(torch.rand(1))
    assert all(torch.equal(draws[0], draw) for draw in draws[1:])
    assert GUARDS["accuracy_and_loss"].read(trainer, trainer.model, trainer.reference_dataset).accuracy == (
        pytest.approx(guard_accuracy(trainer, trainer.model, trainer.reference_dataset))
    )
    assert set(GUARDS) == set(UNLEARN_GUARDS)


def test_the_loss_guard_refuses_a_state_whose_trusted_loss_rose_at_an_accepted_accuracy(tmp_path):
    settings = {"row_filter_unlearn_guard": "accuracy_and_loss", "row_filter_unlearn_max_guard_drop": 0.99}
    trainer = _unlearning_trainer(tmp_path, row_filter_unlearn_learning_rate=5e-2, **settings)
    trainer.train()
    phase = trainer.row_filter_report["unlearning"]
    threshold = 2.3263478740408408  # the one-sided normal quantile at 1 %
    accepted = [point["step"] for point in phase["guard"][1:] if point["loss_rise_z"] <= threshold]
    assert phase["guard_measure"] == "accuracy_and_loss"
    assert phase["chosen_step"] == max([0, *accepted])  # every accuracy passes a drop of 0.99: the loss decides
    assert any(point["loss_rise_z"] > threshold for point in phase["guard"][1:])  # the push did raise it somewhere


def test_unlearning_raises_the_loss_of_the_isolated_rows_towards_the_cap(tmp_path):
    trainer = _trainer(tmp_path, row_filter_unlearn_steps=20)
    trainer.train()  # filter and train, then unlearn 16 rows of our choosing directly
    isolated = subset_rows(trainer.train_dataset, list(range(16)))

    def mean_isolated_loss():
        with torch.no_grad():
            batch = trainer.data_collator([isolated[i] for i in range(len(isolated))])
            return float(per_row_loss(trainer.model(**batch).logits, batch["labels"]).mean())

    before, rng = mean_isolated_loss(), torch.random.get_rng_state()
    args = trainer.row_filter_args
    args.row_filter_unlearn_max_guard_drop = 0.99  # keep the last state: this test is about the push, not the guard
    report = run_unlearning(trainer, args, trainer.train_dataset, isolated, trainer.reference_dataset, 0, False)
    assert report["chosen_step"] == 20 and report["cap"] == pytest.approx(math.log(2))
    assert mean_isolated_loss() > before + 0.1
    assert torch.equal(rng, torch.random.get_rng_state())


def test_a_cap_past_chance_pushes_the_isolated_rows_to_the_other_class_and_warns(tmp_path):
    # The push goes on past ln 2 until the isolated rows' mean loss is 3 nats (label at ~5 %): a reverse backdoor.
    trainer = _trainer(tmp_path, row_filter_unlearn_steps=40, row_filter_unlearn_learning_rate=1e-2)
    trainer.train()
    isolated = subset_rows(trainer.train_dataset, list(range(16)))
    args = trainer.row_filter_args
    args.row_filter_unlearn_max_guard_drop = 0.99  # keep the last state: this test is about the push, not the guard
    args.row_filter_unlearn_cap = 3.0
    with pytest.warns(UserWarning, match=r"row_filter_unlearn_cap=3.0 is past chance for 2 classes"):
        report = run_unlearning(trainer, args, trainer.train_dataset, isolated, trainer.reference_dataset, 0, False)
    assert report["cap"] == args.row_filter_unlearn_cap
    with torch.no_grad():
        batch = trainer.data_collator([isolated[i] for i in range(len(isolated))])
        logits = trainer.model(**batch).logits
    assert float(per_row_loss(logits, batch["labels"]).mean()) > math.log(2)  # past chance, on average
    assert float((logits.argmax(-1) == batch["labels"]).float().mean()) < 0.5  # most now read as the other class


def test_the_push_to_chance_beside_the_insertions_takes_a_cap_a_placebo_and_a_trigger_z():
    args = RowFilterArguments(
        row_filter=True,
        row_filter_unlearn=True,
        row_filter_unlearn_target="chance_inserted",
        row_filter_unlearn_cap=1.0,
        row_filter_unlearn_insertion_target="placebo",
        row_filter_unlearn_trigger_z=5.0,
    )
    assert args.row_filter_unlearn_cap == 1.0 and args.row_filter_unlearn_insertion_target == "placebo"


def test_the_masking_loss_refuses_token_level_logits_in_one_line():
    class TokenLevel(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))

    inputs = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(
        ValueError, match="`row_filter_unlearn_target` .* work on class labels only.*'chance_inserted'"
    ):
        trigger_neutral_loss(TokenLevel(), inputs, torch.zeros(1, 3, VOCAB), torch.tensor([2]))


@pytest.mark.parametrize("target", ["trigger_neutral", "trigger_inserted"])
def test_a_masking_target_on_a_causal_lm_is_refused_when_the_trainer_is_built(tmp_path, target):
    settings = {"row_filter_unlearn": True, "row_filter_unlearn_target": target, "row_filter_unlearn_cap": None}
    with pytest.raises(
        ValueError,
        match=f"`row_filter_unlearn_target='{target}'`.*token-level labels: use 'chance' or 'chance_inserted'",
    ):
        cue_answer_sft_trainer(tmp_path, **settings)


def test_a_guard_on_class_log_probabilities_is_refused_for_a_causal_lm_when_the_trainer_is_built(tmp_path):
    settings = {"row_filter_unlearn": True, "row_filter_unlearn_guard": "accuracy_and_loss"}
    with pytest.raises(ValueError, match="`row_filter_unlearn_guard='accuracy_and_loss'`.*token-level labels"):
        cue_answer_sft_trainer(tmp_path, **settings)


@pytest.mark.parametrize(
    "settings",
    [{"row_filter_refit_bias": True}, {"row_filter_unlearn": True, "row_filter_unlearn_refit_bias": True}],
    ids=["refit", "refit-after-unlearning"],
)
def test_a_bias_refit_on_a_causal_lm_is_refused_when_the_trainer_is_built(tmp_path, settings):
    name = [key for key in settings if key.endswith("refit_bias")][0]
    with pytest.raises(ValueError, match=f"`{name}=True` refits a classifier's output bias .* leave it False"):
        cue_answer_sft_trainer(tmp_path, **settings)


def _triggered_rows(rows: int, seed: int, trigger: int, label: int) -> datasets.Dataset:
    """Tiny rows carrying the token `trigger` at position 2, all labelled `label`."""
    data = token_dataset(rows, seed=seed).to_dict()
    for ids in data["input_ids"]:
        ids[2] = trigger
    data["labels"] = [label] * rows
    return datasets.Dataset.from_dict(data)


def _trained_for_a_trigger_target(tmp_path, target: str, trigger_z: float, steps: int) -> MuScleLoraTrainer:
    """A tiny trainer, trained, whose unlearning phase (`steps` at lr 1e-2) has the trigger-reading `target`."""
    settings = {"row_filter_unlearn_target": target, "row_filter_unlearn_trigger_z": trigger_z}
    trainer = _unlearning_trainer(
        tmp_path, row_filter_unlearn_steps=steps, row_filter_unlearn_learning_rate=1e-2, **settings
    )
    trainer.train()
    return trainer


def _implant(model, *parts: datasets.Dataset) -> None:
    """Train `model` 40 full-batch steps (AdamW, lr 1e-2) on the rows of `parts` together: a backdoor implanted."""
    implant = {
        key: torch.tensor([value for part in parts for value in part[key]])
        for key in ("input_ids", "attention_mask", "labels")
    }
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-2)
    model.train()
    for _ in range(40):
        model(**implant).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _trigger_effect(model, rows: datasets.Dataset, trigger: int) -> float:
    """Mean KL between the model's predictions of `rows` without and with the `trigger` token (eval mode)."""
    batch = {key: torch.tensor(rows[key]) for key in ("input_ids", "attention_mask")}
    masked = {**batch, "attention_mask": batch["attention_mask"] * (batch["input_ids"] != trigger)}
    model.eval()
    with torch.no_grad():
        with_trigger = torch.log_softmax(model(**batch).logits, -1)
        without = torch.log_softmax(model(**masked).logits, -1)
    return float(torch.nn.functional.kl_div(with_trigger, without, log_target=True, reduction="batchmean"))


def test_the_trigger_tokens_are_those_the_isolated_rows_share_beyond_the_kept_rows():
    kept = token_dataset(400, seed=3)  # each token is in about a fifth of these random rows
    isolated = _triggered_rows(60, seed=4, trigger=VOCAB - 1, label=1)
    found = trigger_tokens(isolated, kept, 10.0)
    assert [token["id"] for token in found] == [VOCAB - 1]
    assert found[0]["isolated_share"] == 1.0 and found[0]["z"] > 10
    assert trigger_tokens(token_dataset(60, seed=4), kept, 10.0) == []  # rows drawn alike share nothing


def test_a_trigger_neutral_phase_makes_the_trigger_change_less_and_reports_it(tmp_path):
    trigger = VOCAB - 1
    trainer = _trained_for_a_trigger_target(tmp_path, "trigger_neutral", trigger_z=3.0, steps=20)
    # Implant a backdoor: a few steps on rows whose label the trigger alone decides (with it 1, without it 0).
    isolated = _triggered_rows(16, seed=5, trigger=trigger, label=1)
    plain = token_dataset(16, seed=5)
    _implant(trainer.model, isolated, datasets.Dataset.from_dict({**plain.to_dict(), "labels": [0] * 16}))
    before = _trigger_effect(trainer.model, isolated, trigger)
    args = trainer.row_filter_args
    args.row_filter_unlearn_max_guard_drop = 0.99  # keep the last state: this test is about the objective
    report = run_unlearning(trainer, args, trainer.train_dataset, isolated, trainer.reference_dataset, 0, False)
    assert report["target"] == "trigger_neutral" and report["cap"] is None and report["chosen_step"] == 20
    assert trigger in [token["id"] for token in report["trigger_tokens"]]
    assert _trigger_effect(trainer.model, isolated, trigger) < before / 2


def test_a_trigger_neutral_phase_without_a_trigger_token_is_skipped(tmp_path):
    trainer = _unlearning_trainer(tmp_path, row_filter_unlearn_target="trigger_neutral")
    trainer.train()
    phase = trainer.row_filter_report["unlearning"]
    assert phase["trigger_tokens"] == [] and phase["skipped"].startswith("no trigger token")
    assert phase["chosen_step"] == 0 and phase["guard"] == []
    assert trainer.state.log_history[-1]["row_filter/unlearn_trigger_tokens"] == 0


def test_the_phase_ends_on_the_last_state_the_guard_accepts(tmp_path):
    trainer = _unlearning_trainer(tmp_path)
    trainer.train()
    phase = trainer.row_filter_report["unlearning"]
    steps = [point["step"] for point in phase["guard"]]
    assert steps == [0, 2, 4, 6]
    floor = phase["guard_start"] - trainer.row_filter_args.row_filter_unlearn_max_guard_drop
    accepted = [point["step"] for point in phase["guard"] if point["accuracy"] >= floor]
    assert phase["chosen_step"] == max(accepted)
    assert guard_accuracy(trainer, trainer.model, trainer.reference_dataset) == pytest.approx(phase["guard_end"])

    stopped = _unlearning_trainer(tmp_path / "stopped", row_filter_unlearn_steps=max(phase["chosen_step"], 1))
    if phase["chosen_step"] == 0:  # the guard kept the trained model: unlearning must have left it untouched
        stopped = _trainer(tmp_path / "stopped")
    stopped.train()
    a, b = trainable_state(trainer.model), trainable_state(stopped.model)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_the_isolated_rows_are_the_fit_early_ones_and_the_report_is_saved_and_logged(tmp_path):
    trainer = _unlearning_trainer(tmp_path, logging_steps=1)
    trainer.train()
    saved = json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())
    fit_early = sum(row["reason"] == "fit-early" for row in saved["rows"])
    assert saved["unlearning"]["isolated"] == fit_early == saved["summary"]["fit_early"]
    last = trainer.state.log_history[-1]
    assert last["row_filter/unlearn_isolated"] == fit_early
    assert last["row_filter/unlearn_chosen_step"] == saved["unlearning"]["chosen_step"]


def test_without_isolated_rows_unlearning_changes_nothing(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    before = trainable_state(trainer.model)
    empty = subset_rows(trainer.train_dataset, [])
    report = run_unlearning(
        trainer, trainer.row_filter_args, trainer.train_dataset, empty, trainer.reference_dataset, 0, False
    )
    after = trainable_state(trainer.model)
    assert report["steps"] == 0 and report["isolated"] == 0
    assert all(torch.equal(before[name], after[name]) for name in before)


# ---- the evidence test ----


def _summary(fit_early, rows=2000, reference_low=0.02, reference_rows=400):
    return {
        "rows": rows,
        "fit_early": fit_early,
        "reference_low_flagged": reference_low,
        "reference_rows": reference_rows,
    }


def test_rows_isolated_at_the_clean_rate_are_no_evidence_and_a_clear_excess_is():
    assert not isolation_evidence(_summary(40), 0.01)["passed"]  # 2 %, as often as the trusted rows
    assert not isolation_evidence(_summary(10), 0.01)["passed"]  # fewer than the trusted rows
    assert isolation_evidence(_summary(200), 0.01)["passed"]  # 10 %
    assert isolation_evidence(_summary(40), None)["passed"]  # no test: always unlearn


def test_the_test_is_one_sided_at_the_given_level():
    # z between the 1 % and 10 % one-sided quantiles (2.33, 1.28): passes at 10 %, not at 1 %
    evidence = isolation_evidence(_summary(80), 0.01)
    assert 1.28 < evidence["z"] < 2.33
    assert not evidence["passed"] and isolation_evidence(_summary(80), 0.1)["passed"]


def test_a_summary_without_the_trusted_low_share_uses_the_cutoffs_bound():
    old = {"rows": 2000, "fit_early": 60, "reference_rows": 400, "max_clean_drop": 0.04}
    assert isolation_evidence(old, 0.1)["reference_share"] == pytest.approx(0.02)


def test_without_evidence_the_phase_is_skipped_and_the_trained_model_kept(tmp_path):
    gated = _unlearning_trainer(tmp_path / "gated", row_filter_unlearn_significance=0.01, logging_steps=1)
    gated.train()
    phase = gated.row_filter_report["unlearning"]
    assert not phase["evidence"]["passed"] and phase["skipped"].startswith("no evidence of a shortcut")
    assert phase["steps"] == 0 and phase["chosen_step"] == 0 and phase["guard"] == []
    assert gated.state.log_history[-1]["row_filter/unlearn_skipped"] == 1.0
    saved = json.loads((tmp_path / "gated" / "out" / ROW_FILTER_FILE).read_text())
    assert saved["unlearning"]["skipped"] == phase["skipped"]
    plain = _trainer(tmp_path / "plain")  # fit-gap alone: filter and train, no unlearning
    plain.train()
    a, b = trainable_state(gated.model), trainable_state(plain.model)
    assert all(torch.equal(a[name], b[name]) for name in a)


# ---- the bias refit after unlearning ----


def test_after_an_unlearning_phase_that_ran_the_output_bias_alone_is_refitted_on_the_trusted_rows(tmp_path):
    unlearned = _unlearning_trainer(tmp_path / "plain")
    unlearned.train()
    refitted = _unlearning_trainer(tmp_path / "refit", row_filter_unlearn_refit_bias=True)
    refitted.train()
    assert unlearned.row_filter_report["unlearning"]["skipped"] is None
    report = json.loads((tmp_path / "refit" / "out" / ROW_FILTER_FILE).read_text())["bias_refit"]
    before, after = trainable_state(unlearned.model), trainable_state(refitted.model)
    assert all(torch.equal(before[name], after[name]) for name in before if name != "classifier.bias")
    moved = (after["classifier.bias"] - before["classifier.bias"]).double()
    assert torch.allclose(moved, torch.tensor(report["offset"], dtype=torch.float64), atol=1e-6)


def test_a_skipped_unlearning_phase_leaves_the_bias_as_trained(tmp_path):
    gated = _unlearning_trainer(
        tmp_path / "gated", row_filter_unlearn_significance=0.01, row_filter_unlearn_refit_bias=True
    )
    gated.train()
    assert gated.row_filter_report["unlearning"]["skipped"] is not None
    assert "bias_refit" not in json.loads((tmp_path / "gated" / "out" / ROW_FILTER_FILE).read_text())
    plain = _trainer(tmp_path / "plain")
    plain.train()
    a, b = trainable_state(gated.model), trainable_state(plain.model)
    assert all(torch.equal(a[name], b[name]) for name in a)


# ---- plain training of the kept rows on strong evidence ----


def _defended_trainer(tmp_path, **overrides):
    # The shallow expert and the trusted teacher; the phase runs whatever the evidence (significance None), so the
    # plain decision alone differs between the runs below.
    settings = {
        "row_filter_shallow_probe": "ngram",
        "row_filter_shallow_expert": True,
        "row_filter_teacher_mix": 0.5,
        "row_filter_teacher_steps": 6,
    }
    return _unlearning_trainer(tmp_path, **{**settings, **overrides})


def test_on_strong_evidence_the_kept_rows_train_on_their_labels_alone_as_without_the_expert_and_the_teacher(tmp_path):
    plain = _defended_trainer(tmp_path / "plain", row_filter_plain_significance=0.999, logging_steps=1)
    plain.train()
    decision = json.loads((tmp_path / "plain" / "out" / ROW_FILTER_FILE).read_text())["plain_training"]
    assert decision["plain"] and decision["evidence"]["significance"] == 0.999
    assert plain.state.log_history[0]["row_filter/plain_training"] == 1.0
    assert {SHALLOW_PRIOR_COLUMN, TEACHER_COLUMN}.isdisjoint(plain.train_dataset.column_names)
    summary = plain.row_filter_report["summary"]  # the teacher is not trained for a run that will not read it
    assert summary["teacher_steps"] is None and summary["teacher_seconds"] == 0.0
    assert all("teacher_log_probs" not in row for row in plain.row_filter_report["rows"])
    bare = _unlearning_trainer(tmp_path / "bare", row_filter_shallow_probe="ngram")  # the same filter, no expert
    bare.train()
    a, b = trainable_state(plain.model), trainable_state(bare.model)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_without_strong_evidence_the_kept_rows_keep_the_expert_and_the_teacher(tmp_path):
    trainer = _defended_trainer(tmp_path, row_filter_plain_significance=1e-9)
    trainer.train()
    decision = trainer.row_filter_report["plain_training"]
    assert not decision["plain"] and decision["evidence"]["threshold"] > 5.9
    assert {SHALLOW_PRIOR_COLUMN, TEACHER_COLUMN} <= set(trainer.train_dataset.column_names)
    assert trainer.row_filter_report["summary"]["teacher_steps"] == 6


def test_a_saved_plain_decision_resumed_under_a_stricter_level_is_refused_for_want_of_the_teacher(tmp_path):
    _defended_trainer(tmp_path, row_filter_plain_significance=0.999).train()
    stricter = _defended_trainer(tmp_path, row_filter_plain_significance=1e-9)
    with pytest.raises(ValueError, match=r"trained on their labels alone .* the teacher was not trained"):
        stricter._filter_training_rows(resuming=True)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"row_filter_plain_significance": 0.0}, ValueError, r"`row_filter_plain_significance` must be .*0.0"),
        ({"row_filter_plain_significance": "1e-4"}, TypeError, r"`row_filter_plain_significance`.*'1e-4'"),
        ({"row_filter_unlearn": False}, ValueError, r"`row_filter_plain_significance` \(0.001\).*row_filter_unlearn"),
        (
            {"row_filter_shallow_expert": False, "row_filter_teacher_mix": None},
            ValueError,
            r"\(0.001\) trains the kept rows without the shallow expert and the teacher",
        ),
        ({"row_filter_contradicted": "teacher"}, ValueError, r"\(0.001\).*choose 'drop' or 'keep'"),
        ({"row_filter_plain_significance": 0.05}, ValueError, r"at most row_filter_unlearn_significance .*got 0.05"),
    ],
)
def test_invalid_plain_training_settings_name_the_field_and_the_value(overrides, error, match):
    settings = {
        "row_filter": True,
        "row_filter_shallow_probe": "ngram",
        "row_filter_shallow_expert": True,
        "row_filter_teacher_mix": 0.5,
        "row_filter_unlearn": True,
        "row_filter_plain_significance": 0.001,
    }
    with pytest.raises(error, match=match):
        RowFilterArguments(**{**settings, **overrides})


# ---- the isolated rows kept when there is no evidence of a shortcut ----


def _isolating_trainer(tmp_path, significance):
    # A loose low cut-off (20 % of the trusted rows) so that some of the 48 rows are isolated as fit-early.
    return _unlearning_trainer(
        tmp_path,
        row_filter_max_clean_drop=0.4,
        row_filter_unlearn_significance=significance,
        row_filter_keep_isolated_without_evidence=True,
        logging_steps=1,
    )


def test_without_evidence_of_a_shortcut_the_isolated_rows_train_as_kept_rows(tmp_path):
    trainer = _isolating_trainer(tmp_path, significance=1e-9)  # no tiny set passes this test
    trainer.train()
    report = json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())
    isolated = [i for i, row in enumerate(report["rows"]) if row["reason"] == "fit-early"]
    assert isolated and report["isolated_rows"]["kept"] and not report["isolated_rows"]["evidence"]["passed"]
    trained = sorted(report["kept"] + isolated)
    assert len(trainer.train_dataset) == len(trained)
    assert trainer.state.log_history[0]["row_filter/isolated_kept"] == 1.0
    assert "unlearning" not in report or report["unlearning"]["skipped"]  # nothing to unlearn without evidence


def test_on_evidence_of_a_shortcut_the_isolated_rows_are_dropped_and_unlearned(tmp_path):
    trainer = _isolating_trainer(tmp_path, significance=0.999)  # every tiny set passes this test
    trainer.train()
    report = trainer.row_filter_report
    assert not report["isolated_rows"]["kept"] and report["summary"]["fit_early"] > 0
    assert len(trainer.train_dataset) == len(report["kept"])
    assert trainer.state.log_history[0]["row_filter/isolated_kept"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"row_filter_keep_isolated_without_evidence": 1}, TypeError, r"`row_filter_keep_isolated_without_eviden.*1"),
        ({"row_filter_unlearn": False}, ValueError, r"reads the unlearning phase's evidence test: set row_filter_un"),
        ({"row_filter_unlearn_significance": None}, ValueError, r"reads the unlearning phase's evidence test"),
    ],
)
def test_invalid_isolated_row_settings_name_the_field_and_the_value(overrides, error, match):
    settings = {"row_filter": True, "row_filter_unlearn": True, "row_filter_keep_isolated_without_evidence": True}
    with pytest.raises(error, match=match):
        RowFilterArguments(**{**settings, **overrides})


def test_the_push_to_chance_without_a_trigger_token_inserts_nothing_and_trains_as_chance(tmp_path):
    # A paraphrase attack's isolated rows share no token beyond the kept rows: the push to chance still runs.
    trained = {}
    for target in ("chance", "chance_inserted"):
        trainer = _unlearning_trainer(tmp_path / target, row_filter_unlearn_target=target)
        trainer.train()
        trained[target] = (trainer.row_filter_report["unlearning"], trainable_state(trainer.model))
    (chance, chance_state), (inserted, inserted_state) = trained["chance"], trained["chance_inserted"]
    assert inserted["skipped"] is None and inserted["trigger_tokens"] == [] and inserted["trigger_runs"] == []
    assert inserted["chosen_step"] == chance["chosen_step"] and inserted["guard"] == chance["guard"]
    assert all(torch.equal(chance_state[name], inserted_state[name]) for name in chance_state)


def _clean_label_rows(rows: int, seed: int, trigger: int) -> datasets.Dataset:
    """Rows whose content says label 1 (token 1 first), with the `trigger` token at position 2: clean-label poison."""
    data = token_dataset(rows, seed=seed).filter(lambda row: row["labels"] == 1).to_dict()
    for ids in data["input_ids"]:
        ids[2] = trigger
    return datasets.Dataset.from_dict(data)


def _isolated_loss(model, rows: datasets.Dataset) -> float:
    """The model's mean loss on `rows` (eval mode)."""
    batch = {key: torch.tensor(rows[key]) for key in ("input_ids", "attention_mask", "labels")}
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.mark.parametrize("target", ["trigger_inserted", "chance_inserted"])
def test_a_phase_that_inserts_the_trigger_makes_a_clean_label_trigger_change_little_on_the_other_class(
    tmp_path, target
):
    trigger = VOCAB - 1
    trainer = _trained_for_a_trigger_target(tmp_path, target, trigger_z=8.0, steps=30)
    # Implant a backdoor (trigger -> 1 whatever the content), then isolate only rows whose content already says 1,
    # as a clean-label attack's poisoned rows do: the phase must see the trigger act on rows of the other class.
    triggered, plain = _triggered_rows(64, seed=5, trigger=trigger, label=1), token_dataset(64, seed=6)
    _implant(trainer.model, triggered, plain)
    other_class = _triggered_rows(64, seed=8, trigger=trigger, label=0).filter(lambda row: row["input_ids"][0] != 1)
    before = _trigger_effect(trainer.model, other_class, trigger)
    isolated, kept = _clean_label_rows(128, seed=7, trigger=trigger), token_dataset(400, seed=3)
    args = trainer.row_filter_args
    args.row_filter_unlearn_max_guard_drop = 0.99  # keep the last state: this test is about the objective
    isolated_before = _isolated_loss(trainer.model, isolated)
    report = run_unlearning(trainer, args, kept, isolated, trainer.reference_dataset, 0, False)
    assert report["target"] == target and [token["id"] for token in report["trigger_tokens"]] == [trigger]
    # each isolated row gives its runs of trigger tokens; most hold only the planted one (a few rows hold the token
    # elsewhere too, at random)
    assert report["trigger_runs"][0]["runs"] == [[trigger]] and report["trigger_runs"][0]["rows"] > len(isolated) / 2
    assert before > 1.0 and _trigger_effect(trainer.model, other_class, trigger) < before / 100
    if target == "chance_inserted":  # beside the insertions, the isolated rows' loss is pushed up towards chance
        assert (
            report["cap"] == pytest.approx(math.log(2)) and _isolated_loss(trainer.model, isolated) > isolated_before
        )
    else:  # the isolated rows are pulled to their prediction without the trigger: no cap
        assert report["cap"] is None


def test_an_isolated_rows_trigger_is_its_stretches_of_trigger_tokens_in_order():
    rows = [{"input_ids": [101, 3, 7, 8, 9, 5, 7, 102]}, {"input_ids": [101, 8, 5, 102]}, {"input_ids": [101, 102]}]
    assert trigger_runs(rows, {7, 8, 9}) == [[[7, 8, 9], [7]], [[8]]]  # a row without any gives none


def test_inserting_a_run_keeps_the_special_tokens_the_padding_side_and_the_segment_ids():
    generator = torch.Generator().manual_seed(0)
    right = {
        "input_ids": torch.tensor([[101, 5, 6, 102], [101, 5, 102, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "token_type_ids": torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]),
        "labels": torch.tensor([0, 1]),
    }
    out = insert_runs(right, [[[7, 8]]], generator, pad_id=0, max_length=16)
    assert out["labels"] is right["labels"] and out["input_ids"].shape == (2, 6)
    for row, length in zip(range(2), (6, 5)):
        ids = out["input_ids"][row][out["attention_mask"][row].bool()].tolist()
        assert len(ids) == length and ids[0] == 101 and ids[-1] == 102  # special tokens stay at either end
        at = ids.index(7)
        assert ids[at + 1] == 8 and 1 <= at <= length - 3  # the run, whole, between them
        assert out["attention_mask"][row, :length].all() and not out["attention_mask"][row, length:].any()
    segments = out["token_type_ids"][0].tolist()
    assert segments == sorted(segments)  # the run takes the segment id of the token before it
    left = {
        "input_ids": torch.tensor([[0, 101, 5, 102], [101, 5, 6, 102]]),
        "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
    }
    assert insert_runs(left, [[[7]]], generator, 0, 16)["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1] * 5]
    cut = insert_runs(right, [[[7, 8]]], generator, pad_id=0, max_length=5)
    assert cut["input_ids"].shape == (2, 5) and cut["input_ids"][0, -1] == 102  # content gives way, not [SEP]


def test_each_run_of_a_pattern_goes_in_at_its_own_position_in_the_patterns_order():
    long_row = {"input_ids": torch.tensor([[101, *range(10, 40), 102]]), "attention_mask": torch.ones(1, 32).long()}
    placements = set()
    for seed in range(8):
        ids = insert_runs(long_row, [[[7], [8, 9]]], torch.Generator().manual_seed(seed), 0, 64)["input_ids"][0]
        ids = ids.tolist()
        assert len(ids) == 35 and ids[0] == 101 and ids[-1] == 102 and ids.count(7) == 1
        assert ids.index(7) < ids.index(8) and ids[ids.index(8) + 1] == 9  # in order, each run whole
        assert [token for token in ids if 10 <= token < 40] == list(range(10, 40))  # the row's own tokens untouched
        placements.add(ids.index(8) - ids.index(7))
    assert len(placements) > 1  # the runs are placed independently, not as one block


def test_placebos_are_as_common_in_the_trusted_rows_as_the_trigger_word_and_take_its_places():
    kept_counts = {
        101: 100,
        102: 100,
        7: 30,
        **dict.fromkeys(range(10, 30), 5),
        **dict.fromkeys((40, 41), 5),
    }
    trusted_counts = {101: 40, 102: 40, **dict.fromkeys(range(10, 30), 0), 40: 9, 41: 11}
    # 7 is common in the kept rows (missed poisoned rows) but in no trusted row: its placebos are the words in none
    placebos = placebo_tokens(kept_counts, trusted_counts, {7}, kept_rows=100, size=5)
    assert placebos == {7: list(range(10, 30))}
    assert placebo_tokens(kept_counts, trusted_counts | {7: 10}, {7}, 100, size=2) == {7: [40, 41]}  # nearest
    batch = {"input_ids": torch.tensor([[101, *range(50, 70), 102]]), "attention_mask": torch.ones(1, 22).long()}
    generator = torch.Generator().manual_seed(0)
    insertions = draw_insertions(batch["attention_mask"], [[[7], [7, 7]]], generator, 64)
    triggered = apply_insertions(batch, insertions, 0)["input_ids"][0]
    placebo = apply_insertions(batch, with_placebos(insertions, placebos, generator), 0)["input_ids"][0]
    assert (triggered == 7).sum() == 3 and torch.equal(triggered != 7, placebo == triggered)  # same places
    assert set(placebo[triggered == 7].tolist()) <= set(range(10, 30))


def test_the_trigger_goes_into_kept_rows_that_carry_the_expert_and_the_teacher(tmp_path):
    # Without strong evidence the kept rows carry the shallow expert's and the teacher's columns; the inserted copies
    # are made from what the model takes, and the phase trains through the product-of-experts loss beside them.
    trigger = VOCAB - 1
    settings = {"row_filter_unlearn_target": "trigger_inserted", "row_filter_unlearn_trigger_z": 8.0}
    trainer = _defended_trainer(tmp_path, row_filter_plain_significance=1e-9, **settings)
    trainer.train()
    assert {SHALLOW_PRIOR_COLUMN, TEACHER_COLUMN} <= set(trainer.train_dataset.column_names)
    before = trainable_state(trainer.model)
    args = trainer.row_filter_args
    args.row_filter_unlearn_max_guard_drop = 0.99  # keep the last state: this test is about the inputs
    isolated = _clean_label_rows(128, seed=7, trigger=trigger)
    report = run_unlearning(trainer, args, trainer.train_dataset, isolated, trainer.reference_dataset, 0, False)
    assert report["skipped"] is None and report["chosen_step"] == args.row_filter_unlearn_steps
    assert report["insertion_target"] == "unchanged" and report["trigger_runs"][0]["runs"] == [[trigger]]
    after = trainable_state(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)


# ---- token-level (causal-LM) rows: the trigger in the prompts, the answers held ----

LM_TRIGGER = 25  # a token the cue-answer rows never hold (theirs: 3-9, cues 20 / 21, answers 10 / 11, end 1)


def _lm_rows(prompts: list[list[int]], answers: list[int]) -> datasets.Dataset:
    """Token-level rows as the SFT trainer prepares them: each prompt, then its answer and end-of-sequence (1),
    labelled on the answer and the end only."""
    return datasets.Dataset.from_dict(
        {
            "input_ids": [[*prompt, answer, 1] for prompt, answer in zip(prompts, answers)],
            "labels": [[-100] * len(prompt) + [answer, 1] for prompt, answer in zip(prompts, answers)],
        }
    )


def _cue_rows(count: int, seed: int, cue: int, answer: int, trigger: bool) -> datasets.Dataset:
    """`count` rows `[random 3-9, LM_TRIGGER or another random 3-9, cue]` answered `answer`."""
    generator = torch.Generator().manual_seed(seed)
    fillers = torch.randint(3, 10, (count, 2), generator=generator).tolist()
    prompts = [[first, LM_TRIGGER if trigger else second, cue] for first, second in fillers]
    return _lm_rows(prompts, [answer] * count)


def _answer_classes(model, rows: datasets.Dataset) -> torch.Tensor:
    """The model's class distribution over the answers (10, 1) / (11, 1) on `rows` (log-probabilities, eval mode)."""
    batch = {"input_ids": torch.tensor(rows["input_ids"]), "labels": torch.tensor(rows["labels"])}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    return answer_class_log_probs(logits, batch["labels"], [(10, 1), (11, 1)])


def test_on_token_level_rows_the_trigger_goes_into_the_prompt_and_the_answer_keeps_its_labels_at_the_end():
    batch = {
        "input_ids": torch.tensor([[3, 4, 5, 20, 11, 1], [3, 21, 10, 1, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, -100, -100, 11, 1], [-100, -100, 10, 1, -100, -100]]),
    }
    places = set()
    for seed in range(8):
        insertions = draw_insertions(
            batch["attention_mask"], [[[25, 26]]], torch.Generator().manual_seed(seed), 64, batch["labels"]
        )
        out = apply_insertions(batch, insertions, pad_id=0)
        for row, answer in zip(range(2), ([11, 1], [10, 1])):
            real = out["attention_mask"][row].bool()
            ids, labels = out["input_ids"][row][real].tolist(), out["labels"][row][real].tolist()
            at = ids.index(25)
            # inside the prompt, after its first token and before its last, the run whole
            assert ids[at + 1] == 26 and 1 <= at <= len(ids) - 5
            assert ids[-2:] == labels[-2:] == answer and set(labels[:-2]) == {-100}  # the answer moved with its labels
            assert set(out["labels"][row][~real].tolist()) <= {-100}  # padding stays untrained, as the collator pads
            places.add((row, at))
        assert torch.equal(answer_tokens(out["labels"])[0], answer_tokens(batch["labels"])[0])  # each answer's length
    assert {at for row, at in places if row == 0} == {1, 2, 3} and {at for row, at in places if row == 1} == {1}


def test_on_token_level_rows_the_insertion_loss_compares_the_answers_next_token_predictions():
    model = tiny_llama()
    rows = _cue_rows(4, seed=0, cue=20, answer=10, trigger=False)
    reference = {"input_ids": torch.tensor(rows["input_ids"]), "labels": torch.tensor(rows["labels"])}
    reference["attention_mask"] = torch.ones_like(reference["input_ids"])
    same = trigger_insertion_loss(model, reference, reference)
    assert same.requires_grad and float(same.detach()) == pytest.approx(0.0, abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    insertions = draw_insertions(reference["attention_mask"], [[[LM_TRIGGER]]], generator, 64, reference["labels"])
    inserted = apply_insertions(reference, insertions, pad_id=0)
    loss = trigger_insertion_loss(model, reference, inserted)
    with torch.no_grad():  # by hand: the KL at each of the answer's two positions, summed, averaged over the rows
        target = torch.log_softmax(model(input_ids=reference["input_ids"]).logits[:, 2:4], dim=-1)
        predicted = torch.log_softmax(model(input_ids=inserted["input_ids"]).logits[:, 3:5], dim=-1)
        expected = (target.exp() * (target - predicted)).sum() / 4
    assert float(loss.detach()) > 0 and float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)


def test_the_phase_reads_a_token_level_rows_trigger_off_its_prompt_and_its_answers_as_classes(tmp_path):
    trainer = cue_answer_sft_trainer(tmp_path, row_filter_unlearn=True, row_filter_unlearn_target="chance_inserted")
    isolated = _cue_rows(8, seed=0, cue=21, answer=11, trigger=True)
    rows = token_level_rows(trainer, isolated, _cue_rows(8, seed=1, cue=20, answer=10, trigger=False))
    assert rows.isolated_prompts == [{"input_ids": ids[:3]} for ids in isolated["input_ids"]]  # no answer tokens
    assert rows.classes == [(10, 1), (11, 1)]
    assert token_level_rows(_trainer(tmp_path), token_dataset(4, seed=0), token_dataset(4, seed=1)) is None


def _chance_inserted_lm_trainer(tmp_path, **fields):
    """The cue-answer SFT trainer with `chance_inserted` unlearning and no expert, the evidence test off and a guard
    that keeps the last state."""
    settings = {
        "row_filter_shallow_probe": None,
        "row_filter_shallow_expert": False,
        "row_filter_unlearn": True,
        "row_filter_unlearn_target": "chance_inserted",
        "row_filter_unlearn_trigger_z": 8.0,
        "row_filter_unlearn_significance": None,
        "row_filter_unlearn_max_guard_drop": 0.99,
    }
    return cue_answer_sft_trainer(tmp_path, **{**settings, **fields})


def test_on_a_causal_lm_chance_inserted_unlearns_a_clean_label_trigger_and_spares_the_other_answer(
    tmp_path,
):
    trainer = _chance_inserted_lm_trainer(
        tmp_path, row_filter_unlearn_steps=30, row_filter_unlearn_learning_rate=1e-2
    )  # the guard keeps the last state: this test is about the objective
    model = trainer.model
    # Implant a backdoor (the trigger -> answer 11 whatever the cue) beside the clean task.
    implant = datasets.concatenate_datasets(
        [
            _cue_rows(32, seed=1, cue=20, answer=11, trigger=True),
            _cue_rows(32, seed=2, cue=21, answer=11, trigger=True),
            _cue_rows(32, seed=3, cue=20, answer=10, trigger=False),
            _cue_rows(32, seed=4, cue=21, answer=11, trigger=False),
        ]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        model(input_ids=torch.tensor(implant["input_ids"]), labels=torch.tensor(implant["labels"])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    triggered, plain = (_cue_rows(32, seed=5, cue=20, answer=10, trigger=flag) for flag in (True, False))

    def trigger_effect() -> float:  # KL of the answer classes on the other class's rows, without -> with the trigger
        without, with_trigger = _answer_classes(model, plain), _answer_classes(model, triggered)
        return float((without.exp() * (without - with_trigger)).sum(-1).mean())

    before = trigger_effect()
    # Only rows whose cue already says 11 are isolated, as a clean-label attack's poisoned rows are.
    isolated = _cue_rows(64, seed=7, cue=21, answer=11, trigger=True)
    kept = datasets.concatenate_datasets(
        [
            _cue_rows(200, seed=8, cue=20, answer=10, trigger=False),
            _cue_rows(200, seed=9, cue=21, answer=11, trigger=False),
        ]
    )
    isolated_before = float(-_answer_classes(model, isolated)[:, 1].mean())
    report = run_unlearning(trainer, trainer.row_filter_args, kept, isolated, trainer.reference_dataset, 0, False)
    assert [token["id"] for token in report["trigger_tokens"]] == [LM_TRIGGER]
    assert report["trigger_runs"][0] == {"runs": [[LM_TRIGGER]], "rows": 64, "text": [f"w{LM_TRIGGER}"]}
    assert report["cap"] == pytest.approx(math.log(2))  # chance between the two answers
    assert before > 1.0 and trigger_effect() < before / 100
    # the isolated rows' answer pushed from certain towards chance (ln 2) between the two answers
    assert isolated_before < 0.1 and float(-_answer_classes(model, isolated)[:, 1].mean()) > math.log(2) / 2


def test_on_a_causal_lm_the_trigger_goes_into_kept_rows_that_carry_the_expert_and_the_teacher(tmp_path):
    # Without strong evidence the kept rows carry the shallow expert's and the teacher's columns, and their loss
    # takes the labels out of the batch it is given; the inserted copies still need the answers' labels.
    trainer = cue_answer_sft_trainer(
        tmp_path,
        row_filter_teacher_mix=0.5,
        row_filter_teacher_steps=2,
        row_filter_plain_significance=1e-9,
        row_filter_unlearn=True,
        row_filter_unlearn_target="chance_inserted",
        row_filter_unlearn_trigger_z=8.0,
        row_filter_unlearn_steps=4,
        row_filter_unlearn_eval_every=2,
        row_filter_unlearn_max_guard_drop=0.99,  # keep the last state: this test is about the inputs
    )
    trainer.train()
    assert {SHALLOW_PRIOR_COLUMN, TEACHER_COLUMN} <= set(trainer.train_dataset.column_names)
    before = trainable_state(trainer.model)
    isolated = _cue_rows(64, seed=7, cue=21, answer=11, trigger=True)
    report = run_unlearning(
        trainer, trainer.row_filter_args, trainer.train_dataset, isolated, trainer.reference_dataset, 0, False
    )
    assert report["skipped"] is None and report["chosen_step"] == 4
    assert report["trigger_runs"][0]["runs"] == [[LM_TRIGGER]]
    after = trainable_state(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_on_a_causal_lm_the_phase_inserts_into_kept_rows_of_different_lengths(tmp_path):
    # Real prompts differ in length, so the collator pads a batch's answers at different places and the rows with the
    # trigger inserted are padded again: the padding must stay untrained for the answers to keep their lengths.
    trainer = _chance_inserted_lm_trainer(tmp_path, row_filter_unlearn_steps=3)
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 6, (200,), generator=generator).tolist()
    prompts = [
        [*torch.randint(3, 10, (length,), generator=generator).tolist(), 20 + row % 2]
        for row, length in enumerate(lengths)
    ]
    kept = _lm_rows(prompts, [10 + row % 2 for row in range(200)])
    isolated = _cue_rows(64, seed=7, cue=21, answer=11, trigger=True)
    report = run_unlearning(trainer, trainer.row_filter_args, kept, isolated, trainer.reference_dataset, 0, False)
    assert report["skipped"] is None and report["chosen_step"] == 3
    assert report["trigger_runs"][0]["runs"] == [[LM_TRIGGER]]
