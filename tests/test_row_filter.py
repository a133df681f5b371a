"""Fit-gap row filtering: the pure decision rule, and the trainer that probes, filters and trains on the kept rows."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch

from peft_musclelora import MuScleLoraTrainer
from peft_musclelora.row_filter import (
    ROW_FILTER_FILE,
    RowFilterArguments,
    _score,
    choose_cutoffs,
    decide_rows,
    fold_assignment,
    length_order,
    per_row_loss,
    percentile_ranks,
)

from .ga_helpers import (
    assert_filter_leaves_state_as_found,
    row_filter_training_args,
    tiny_bert,
    token_dataset,
    trainable_state,
)

# ---- the decision rule ----


def test_percentiles_are_mid_ranks_and_leave_one_out_excludes_the_row_itself():
    reference = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert percentile_ranks(torch.tensor([0.5, 2.0, 5.0]), reference).tolist() == [0.0, 0.375, 1.0]
    assert percentile_ranks(reference, reference, leave_one_out=True).tolist() == [0.0, 1 / 3, 2 / 3, 1.0]


@pytest.mark.parametrize("refs", [50, 200, 999])
@pytest.mark.parametrize("max_clean_drop", [0.01, 0.04, 0.2])
def test_cutoffs_flag_at_most_the_allowed_share_of_trusted_rows(refs, max_clean_drop):
    generator = torch.Generator().manual_seed(refs)
    low, high = torch.rand(refs, generator=generator), torch.rand(refs, generator=generator)
    low_cut, high_cut = choose_cutoffs(low, high, max_clean_drop)
    assert int((low < low_cut).sum()) <= max_clean_drop / 2 * refs
    assert int((high > high_cut).sum()) <= max_clean_drop / 2 * refs


def test_ties_never_make_a_cutoff_flag_more_rows():
    low = torch.zeros(100)  # every trusted row is fitted better than every other: nothing can be cut below
    high = torch.ones(100)
    low_cut, high_cut = choose_cutoffs(low, high, 0.2)
    assert not bool((low < low_cut).any()) and not bool((high > high_cut).any())


def test_extended_tails_score_rows_beyond_every_trusted_row_by_their_distance_and_leave_the_middle_alone():
    reference = torch.tensor([1.0, 2.0, 3.0, 4.0])
    losses = torch.tensor([0.01, 0.5, 2.0, 5.0, 50.0])
    plain = percentile_ranks(losses, reference)
    extended = percentile_ranks(losses, reference, extend_tails=True)
    assert extended[2] == plain[2]  # inside the trusted range: the mid-rank percentile
    assert extended[0] < extended[1] < 0 and 1 < extended[3] < extended[4]  # the further out, the more extreme
    # leave-one-out: the trusted extremes are scored against the other rows' extremes, so they too lie beyond 0 / 1
    own = percentile_ranks(reference, reference, leave_one_out=True, extend_tails=True)
    assert own[0] < 0 and own[3] > 1 and own[1:3].tolist() == [1 / 3, 2 / 3]


def _ten_steps_each_best_fitting_another_trusted_row() -> torch.Tensor:
    """100 trusted rows over 10 probe steps; at step k trusted row k is fitted better than every other row, so 10
    trusted scores tie at percentile 0."""
    refs = torch.linspace(1.0, 2.0, 100).repeat(10, 1)
    for step in range(10):
        refs[step, step] = 0.5 - 0.01 * step
    return refs


def test_extended_tails_let_a_tight_bound_flag_what_it_allows_where_ties_would_flag_nothing():
    refs = _ten_steps_each_best_fitting_another_trusted_row()
    train = torch.tensor([1e-6, 1.5]).repeat(10, 1)  # a far shortcut and a typical row, at every step
    rule = {"train_groups": [0, 0], "train_folds": [0, 0], "reference_groups": [0] * 100, "max_clean_drop": 0.1}
    extended = decide_rows(train[None], reference_losses=refs[None], **rule, extend_tails=True)
    assert extended.reasons == ["fit-early", "keep"] and extended.reference_low_flagged == 0.05
    assert extended.tails == "extended"
    # the bound allows 5 trusted scores a side and 10 tie at 0: a tied cut-off would sit at 0 and flag no row, so
    # the tied rule extends the tails on its own, and says so
    tied = decide_rows(train[None], reference_losses=refs[None], **rule)
    assert tied.tails == "extended on a tie" and tied.summary()["tails"] == "extended on a tie"
    assert (tied.reasons, tied.low_cut, tied.high_cut) == (extended.reasons, extended.low_cut, extended.high_cut)


def test_ties_within_the_bound_keep_the_tied_rule():
    refs = _ten_steps_each_best_fitting_another_trusted_row()
    train = torch.tensor([1e-6, 1.5]).repeat(10, 1)
    rule = {"train_groups": [0, 0], "train_folds": [0, 0], "reference_groups": [0] * 100, "max_clean_drop": 0.3}
    tied = decide_rows(train[None], reference_losses=refs[None], **rule)  # 15 scores a side allowed, 10 ties
    assert tied.tails == "tied" and tied.reasons == ["fit-early", "keep"]
    assert tied.low_cut > 0 and tied.reference_low_flagged == 0.15  # the ten ties and five more: the bound's 15


def test_four_hundred_trusted_rows_never_leave_the_default_bound_to_the_ties():
    # the worst case of the recommended defense's filter: two labels of 200 trusted rows, two folds, four scored
    # columns (three probe steps and the shallow probe), every column's best and worst row a different trusted row.
    # At most 2 x 2 x 4 = 16 scores tie at each end and the default bound (0.04) allows 16 of the 800 a side, so the
    # tied rule is kept: the decisions measured with 400 trusted rows are what this rule gives.
    generator = torch.Generator().manual_seed(0)
    refs = torch.rand(2, 4, 400, generator=generator) + 1.0
    groups = [0] * 200 + [1] * 200
    for fold, column, group in itertools.product(range(2), range(4), range(2)):
        row = group * 200 + fold * 4 + column
        refs[fold, column, row] = 0.1 * (1 + column)  # fitted better than every other trusted row of its label
        refs[fold, column, row + 100] = 9.0 + column  # and worse
    train = torch.tensor([[[1e-6]] * 4, [[1e-6]] * 4]).expand(2, 4, 2).contiguous()
    decisions = decide_rows(train, [0, 1], [0, 1], refs, groups, max_clean_drop=0.04)
    assert decisions.tails == "tied"
    assert decisions.reference_low_flagged == 16 / 800 and decisions.reasons == ["fit-early", "fit-early"]


def test_rows_fitted_better_or_worse_than_every_trusted_row_are_dropped_typical_rows_kept():
    refs = torch.linspace(1.0, 2.0, 100).view(1, 1, -1)  # one fold, one probe step
    train = torch.tensor([[[0.001, 1.5, 1.2, 50.0]]])
    decisions = decide_rows(train, [0, 0, 0, 0], [0] * 4, refs, [0] * 100, max_clean_drop=0.04)
    assert decisions.reasons == ["fit-early", "keep", "keep", "contradicted"]
    assert decisions.kept == [1, 2]
    assert decisions.reference_flagged <= 0.04
    assert decisions.summary()["fit_early"] == 1 and decisions.summary()["contradicted"] == 1


def test_keeping_contradicted_rows_cuts_the_fit_early_side_only():
    refs = torch.linspace(1.0, 2.0, 100).view(1, 1, -1)
    train = torch.tensor([[[0.001, 1.5, 1.2, 50.0]]])
    both = decide_rows(train, [0] * 4, [0] * 4, refs, [0] * 100, max_clean_drop=0.04)
    low_only = decide_rows(train, [0] * 4, [0] * 4, refs, [0] * 100, max_clean_drop=0.04, flag_contradicted=False)
    assert low_only.reasons == ["fit-early", "keep", "keep", "keep"]
    assert low_only.low_cut == both.low_cut and low_only.high_cut is None
    # only the low side's trusted flags count: the rule now flags no more trusted rows than its fit-early side does
    assert low_only.reference_flagged == low_only.reference_low_flagged == both.reference_low_flagged
    assert low_only.summary()["contradicted"] == 0 and low_only.summary()["high_cut"] is None


def test_percentiles_are_taken_within_each_label():
    # label 0's trusted losses are small, label 1's large: a loss of 1.0 is typical for 0 and early-fit for 1
    refs = torch.cat([torch.linspace(0.5, 1.5, 50), torch.linspace(5.0, 6.0, 50)]).view(1, 1, -1)
    groups = [0] * 50 + [1] * 50
    train = torch.tensor([[[1.0, 1.0]]])
    decisions = decide_rows(train, [0, 1], [0, 0], refs, groups, max_clean_drop=0.04)
    assert decisions.reasons == ["keep", "fit-early"]


def test_a_label_without_trusted_rows_is_an_error_naming_it():
    refs = torch.ones(1, 1, 4)
    with pytest.raises(ValueError, match=r"labels \[2\]"):
        decide_rows(torch.ones(1, 1, 1), [2], [0], refs, [0, 0, 1, 1], max_clean_drop=0.04)


def test_folds_are_balanced_and_seeded():
    folds = fold_assignment(101, 3, seed=5)
    assert sorted(folds.count(f) for f in range(3)) == [33, 34, 34]
    assert folds == fold_assignment(101, 3, seed=5) != fold_assignment(101, 3, seed=6)


def test_per_row_loss_of_a_causal_lm_averages_the_labelled_next_tokens():
    logits = torch.zeros(2, 3, 5)  # uniform: every labelled token costs log 5
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 4]])
    assert torch.allclose(per_row_loss(logits, labels), torch.full((2,), torch.log(torch.tensor(5.0))))


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("row_filter", "yes", TypeError),
        ("row_filter_probe_steps", [], TypeError),
        ("row_filter_probe_steps", [0, 8], ValueError),
        ("row_filter_probe_steps", [8.5], TypeError),
        ("row_filter_folds", 1, ValueError),
        ("row_filter_folds", 2.0, TypeError),
        ("row_filter_max_clean_drop", 0.0, ValueError),
        ("row_filter_max_clean_drop", 0.5, ValueError),
        ("row_filter_max_clean_drop", float("nan"), TypeError),
        ("row_filter_probe_learning_rate", -1e-3, ValueError),
        ("row_filter_extend_tails", "yes", TypeError),
        ("row_filter_contradicted", "relabel", ValueError),
        ("row_filter_contradicted", None, TypeError),
        ("row_filter_contradicted", ["drop"], TypeError),
        ("row_filter_shallow_probe", ["ngram"], TypeError),
    ],
)
def test_invalid_settings_name_the_field_and_the_value(field, value, error):
    with pytest.raises(error, match=rf"`{field}`.*{repr(value)[:4].replace('[', '')}"):
        RowFilterArguments(**{field: value})


def test_probe_steps_are_sorted_and_deduplicated():
    assert RowFilterArguments(row_filter_probe_steps=[32, 8, 8]).row_filter_probe_steps == [8, 32]


# ---- the trainer ----


_args = row_filter_training_args


def _trainer(tmp_path, train=None, data_collator=None, **overrides):
    train = token_dataset(48, seed=1) if train is None else train
    return MuScleLoraTrainer(
        model=tiny_bert(seed=0),
        args=_args(tmp_path, **overrides),
        train_dataset=train,
        reference_dataset=token_dataset(40, seed=2),
        data_collator=data_collator,
    )


def test_probes_leave_the_weights_and_the_random_state_as_they_found_them(tmp_path):
    trainer = _trainer(tmp_path)
    report = assert_filter_leaves_state_as_found(trainer)
    assert len(report["rows"]) == 48 and len(report["rows"][0]["losses"]) == 2
    # the trusted rows' losses are saved too, so a cut-off can be recomputed from the report alone
    assert report["reference"]["groups"] == token_dataset(40, seed=2)["labels"]
    assert torch.tensor(report["reference"]["losses"]).shape == (2, 2, 40)  # (folds, probe steps, trusted rows)
    assert report["reference"]["row_groups"] == token_dataset(48, seed=1)["labels"]
    assert report["reference"]["low_columns"] == [True, True]


@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_the_probes_train_in_train_mode_whatever_mode_the_model_is_in_and_whatever_trained_before_them(
    tmp_path, teacher, training
):
    overrides = {"row_filter_teacher_mix": 0.5, "row_filter_teacher_steps": 6} if teacher else {}
    trainer = MuScleLoraTrainer(
        model=tiny_bert(seed=0, dropout=0.1),  # dropout: a probe step in eval mode would be another step
        args=_args(tmp_path, row_filter_probe_steps=[1, 4], **overrides),
        train_dataset=token_dataset(48, seed=1),
        reference_dataset=token_dataset(40, seed=2),
    )
    trainer.model.train(training)
    report = assert_filter_leaves_state_as_found(trainer)
    assert trainer.model.training is training  # the mode is left as found
    # Against a reference: no teacher, the model in train mode from the start.
    reference = MuScleLoraTrainer(
        model=tiny_bert(seed=0, dropout=0.1),
        args=_args(tmp_path / "reference", row_filter_probe_steps=[1, 4]),
        train_dataset=token_dataset(48, seed=1),
        reference_dataset=token_dataset(40, seed=2),
    )
    reference.model.train()
    expected = assert_filter_leaves_state_as_found(reference)
    assert [row["losses"] for row in report["rows"]] == [row["losses"] for row in expected["rows"]]
    assert report["reference"]["losses"] == expected["reference"]["losses"]


def test_the_teacher_predicts_the_same_and_the_probes_score_the_same_whether_it_trains_before_or_after_them(tmp_path):
    # An expert gate reads the teacher, so it trains before the probes; with the mix alone it trains after them.
    common = {"row_filter_shallow_probe": "ngram", "row_filter_shallow_expert": True, "row_filter_teacher_steps": 6}
    reports = []
    for name, gate in (("before", {"row_filter_shallow_expert_gate": "teacher_doubt"}), ("after", {})):
        trainer = MuScleLoraTrainer(
            model=tiny_bert(seed=0, dropout=0.1),
            args=_args(tmp_path / name, row_filter_probe_steps=[1, 4], row_filter_teacher_mix=0.5, **common, **gate),
            train_dataset=token_dataset(48, seed=1),
            reference_dataset=token_dataset(40, seed=2),
        )
        reports.append(assert_filter_leaves_state_as_found(trainer))
    before, after = reports
    assert [row["teacher_log_probs"] for row in before["rows"]] == [row["teacher_log_probs"] for row in after["rows"]]
    assert [row["losses"] for row in before["rows"]] == [row["losses"] for row in after["rows"]]
    assert before["summary"]["teacher_offset"] == after["summary"]["teacher_offset"]


def _pad(rows):
    width = max(len(row["input_ids"]) for row in rows)
    pad = [width - len(row["input_ids"]) for row in rows]
    return {
        "input_ids": torch.tensor([row["input_ids"] + [0] * n for row, n in zip(rows, pad)]),
        "attention_mask": torch.tensor([[1] * len(row["input_ids"]) + [0] * n for row, n in zip(rows, pad)]),
        "labels": torch.tensor([row["labels"] for row in rows]),
    }


def test_scoring_batches_rows_by_length_and_returns_each_rows_own_loss_in_dataset_order(tmp_path):
    lengths = torch.randint(2, 9, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    rows = token_dataset(30, seed=5)

    def cut(row, i):
        return {name: row[name][: lengths[i]] for name in ("input_ids", "attention_mask")}

    ragged = rows.map(cut, with_indices=True)
    trainer = _trainer(tmp_path, train=ragged, data_collator=_pad)
    losses, groups = _score(trainer, trainer.model, ragged)
    trainer.model.eval()
    with torch.no_grad():  # one row per forward: no padding at all
        alone = [per_row_loss(trainer.model(**_pad([row])).logits, torch.tensor([row["labels"]])) for row in ragged]
    assert groups == ragged["labels"]
    assert torch.allclose(losses, torch.cat(alone).double(), rtol=1e-4, atol=1e-6)  # float rounding only
    assert length_order(ragged)[0] == lengths.index(max(lengths))


def test_training_with_the_filter_is_training_on_the_kept_rows(tmp_path):
    filtered = _trainer(tmp_path / "a")
    filtered.train()
    report = json.loads((tmp_path / "a" / "out" / ROW_FILTER_FILE).read_text())
    assert report["kept"] == [i for i, row in enumerate(report["rows"]) if row["reason"] == "keep"]
    assert report["summary"]["rows"] == 48 and report["summary"]["reference_flagged"] <= 0.2
    assert len(filtered.train_dataset) == len(report["kept"])

    plain = _trainer(tmp_path / "b", train=token_dataset(48, seed=1).select(report["kept"]), row_filter=False)
    plain.train()
    a, b = trainable_state(filtered.model), trainable_state(plain.model)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_filter_with_too_few_trusted_rows_for_a_tied_cut_scores_the_tails_and_says_so(tmp_path, caplog):
    # 40 trusted rows, two labels, two folds, two probe steps: up to 8 scores tie at 0 and the bound (0.04) allows
    # 1 of the 80 a side, so a tied cut-off would sit at 0 and flag nothing
    trainer = _trainer(tmp_path, row_filter_max_clean_drop=0.04)
    with caplog.at_level(logging.INFO, logger="peft_musclelora.row_filter"):
        trainer.train()
    summary = trainer.row_filter_report["summary"]
    assert summary["tails"] == "extended on a tie" and summary["reference_flagged"] <= 0.04
    assert "scored by their distance" in caplog.text
    assert json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())["summary"]["tails"] == "extended on a tie"


def test_the_first_training_log_reports_what_the_filter_did(tmp_path):
    trainer = _trainer(tmp_path, logging_steps=1)
    trainer.train()
    first = next(log for log in trainer.state.log_history if "loss" in log)
    assert first["row_filter/kept"] == len(trainer.row_filter_report["kept"])
    assert "row_filter/low_cut" in first and "row_filter/reference_flagged" in first
    assert not any("row_filter/kept" in log for log in trainer.state.log_history if log is not first)


def test_a_filter_that_keeps_contradicted_rows_logs_no_high_cut(tmp_path):
    trainer = _trainer(tmp_path, logging_steps=1, row_filter_contradicted="keep")
    trainer.train()
    summary = trainer.row_filter_report["summary"]
    assert summary["contradicted"] == 0 and summary["high_cut"] is None and summary["contradicted_action"] == "keep"
    first = next(log for log in trainer.state.log_history if "loss" in log)
    assert "row_filter/low_cut" in first and "row_filter/high_cut" not in first
    saved = json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())["summary"]
    assert saved["high_cut"] is None  # strict JSON: no Infinity


def test_a_resumed_run_reads_the_saved_decisions_instead_of_probing_again(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    trainer.train()
    kept = trainer.row_filter_report["kept"]
    again = _trainer(tmp_path)
    monkeypatch.setattr("peft_musclelora.trainer.run_row_filter", lambda *a, **k: pytest.fail("probed again"))
    again._filter_training_rows(resuming=True)
    assert again.row_filter_report["kept"] == kept and len(again.train_dataset) == len(kept)


def test_a_saved_decision_file_for_another_training_set_is_refused(tmp_path):
    _trainer(tmp_path).train()
    other = _trainer(tmp_path, train=token_dataset(30, seed=1))
    with pytest.raises(ValueError, match="decisions for 48 rows, the training set has 30"):
        other._filter_training_rows(resuming=True)


def test_a_saved_decision_file_made_under_another_contradicted_action_is_refused(tmp_path):
    _trainer(tmp_path).train()
    other = _trainer(tmp_path, row_filter_contradicted="keep")
    with pytest.raises(ValueError, match=r"row_filter_contradicted='drop', this run asks for 'keep'"):
        other._filter_training_rows(resuming=True)


def test_the_filter_needs_trusted_rows(tmp_path):
    with pytest.raises(ValueError, match="`row_filter=True` calibrates"):
        MuScleLoraTrainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=token_dataset(8, seed=1))


def test_row_filter_args_are_refused_next_to_arguments_that_already_hold_them(tmp_path):
    with pytest.raises(ValueError, match="`row_filter_args` must be None"):
        MuScleLoraTrainer(
            model=tiny_bert(),
            args=_args(tmp_path),
            train_dataset=token_dataset(8, seed=1),
            reference_dataset=token_dataset(8, seed=2),
            row_filter_args=RowFilterArguments(),
        )
