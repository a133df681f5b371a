"""The expert probe steps (`row_filter_expert_probe_steps`): each fold probe trains on as a product of experts with the
shallow expert, and its scores count for the contradicted side of the rule only."""

from __future__ import annotations

import json

import pytest
import torch

from peft_musclelora import MuScleLoraTrainer
from peft_musclelora.row_filter import (
    ROW_FILTER_FILE,
    SHALLOW_PRIOR_COLUMN,
    RowFilterArguments,
    decide_rows,
    run_row_filter,
    shallow_expert_log_probs,
)

from .ga_helpers import (
    assert_filter_leaves_state_as_found,
    cue_answer_sft_trainer,
    row_filter_training_args,
    tiny_bert,
    token_dataset,
)

EXPERT = {
    "row_filter_shallow_probe": "ngram",
    "row_filter_shallow_expert": True,
    "row_filter_shallow_expert_weight": 4.0,
    "row_filter_expert_probe_steps": [6, 8],
}


def _trainer(tmp_path, dropout: float = 0.0, **fields):
    return MuScleLoraTrainer(
        model=tiny_bert(seed=0, dropout=dropout),
        args=row_filter_training_args(tmp_path, **{**EXPERT, **fields}),
        train_dataset=token_dataset(48, seed=1),
        reference_dataset=token_dataset(40, seed=2),
    )


# ---- settings ----


@pytest.mark.parametrize(
    ("steps", "error", "message"),
    [
        ([], TypeError, r"`row_filter_expert_probe_steps` must be a non-empty list of integers >= 1, got \[\]"),
        ([8, True], TypeError, r"`row_filter_expert_probe_steps` must be .*got \[8, True\]"),
        ("96", TypeError, r"`row_filter_expert_probe_steps` must be .*got '96'"),
        ([0], ValueError, r"`row_filter_expert_probe_steps` must be .*got \[0\]"),
        ([64, 96], ValueError, r"`row_filter_expert_probe_steps` continue the probes past their last step \(64\).*"),
    ],
)
def test_invalid_expert_probe_steps_name_the_field_and_the_value(steps, error, message):
    with pytest.raises(error, match=message):
        RowFilterArguments(
            row_filter=True,
            row_filter_shallow_probe="ngram",
            row_filter_shallow_expert=True,
            row_filter_expert_probe_steps=steps,
        )


def test_expert_probe_steps_are_sorted_deduplicated_and_need_the_shallow_expert():
    args = RowFilterArguments(
        row_filter=True,
        row_filter_shallow_probe="ngram",
        row_filter_shallow_expert=True,
        row_filter_expert_probe_steps=[128, 96, 128],
    )
    assert args.row_filter_expert_probe_steps == [96, 128]
    with pytest.raises(ValueError, match=r"set row_filter_shallow_expert=True as well.*got \[96\]"):
        RowFilterArguments(row_filter=True, row_filter_shallow_probe="ngram", row_filter_expert_probe_steps=[96])


# ---- the rule ----


def test_a_step_that_counts_for_the_contradicted_side_only_never_makes_a_row_fit_early():
    ref = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 1.5, 2.5, 3.5, 4.5]] * 2])  # one fold, two steps, 8 trusted rows
    train = torch.tensor([[[2.2, 2.2, 2.2], [0.01, 2.2, 99.0]]])  # the second step: a shortcut, typical, contradicted
    both = decide_rows(train, [0] * 3, [0] * 3, ref, [0] * 8, max_clean_drop=0.3)
    high_only = decide_rows(train, [0] * 3, [0] * 3, ref, [0] * 8, max_clean_drop=0.3, low_columns=[True, False])
    assert both.reasons == ["fit-early", "keep", "contradicted"]
    assert high_only.reasons == ["keep", "keep", "contradicted"]
    assert high_only.low[0] == both.percentiles[0][0]  # `low` is the first step's alone


def test_low_columns_must_name_every_step_and_keep_one():
    ref, train = torch.zeros(1, 2, 4), torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=r"`low_columns` must name 2 probe steps, at least one of them True"):
        decide_rows(train, [0] * 3, [0] * 3, ref, [0] * 4, 0.3, low_columns=[True])
    with pytest.raises(ValueError, match=r"`low_columns` must name 2 probe steps"):
        decide_rows(train, [0] * 3, [0] * 3, ref, [0] * 4, 0.3, low_columns=[False, False])


# ---- the probes ----


def test_the_expert_steps_train_the_probe_on_the_shallow_experts_predictions_of_the_rows_in_each_batch(tmp_path):
    trainer = _trainer(tmp_path)
    calls: list[tuple[bool, int]] = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        calls.append((SHALLOW_PRIOR_COLUMN in inputs, len(inputs["labels"])))
        if SHALLOW_PRIOR_COLUMN in inputs:
            recorded.append((inputs["input_ids"].clone(), inputs[SHALLOW_PRIOR_COLUMN].clone()))
        return compute_loss(model, inputs, *args, **kwargs)

    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    trainer.compute_loss = recording
    report = run_row_filter(trainer, trainer.row_filter_args, trainer.reference_dataset, seed=0, progress=False)
    # Two folds: 4 plain steps each, then 4 more (to step 8) with the expert.
    assert [with_expert for with_expert, _ in calls] == ([False] * 4 + [True] * 4) * 2
    expert = shallow_expert_log_probs([row["shallow_log_probs"] for row in report["rows"]], trainer.row_filter_args)
    by_ids = {tuple(row["input_ids"]): index for index, row in enumerate(trainer.train_dataset)}
    for input_ids, prior in recorded:
        for ids, row_prior in zip(input_ids.tolist(), prior):
            row = by_ids[tuple(token for token in ids if token != 0)]  # unpadded
            assert torch.allclose(row_prior.double(), expert[row], atol=1e-6)


def test_expert_steps_are_scored_after_the_plain_ones_and_calibrated_on_the_trusted_rows(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    report = json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())
    summary = report["summary"]
    assert (summary["probe_steps"], summary["expert_probe_steps"]) == ([2, 4], [6, 8])
    # losses: probe steps 2, 4, expert steps 6, 8, then the shallow probe's
    assert all(len(row["losses"]) == 5 and len(row["percentiles"]) == 5 for row in report["rows"])
    assert all(row["low"] == min(row["percentiles"][:2] + row["percentiles"][4:]) for row in report["rows"])
    assert all(row["high"] == max(row["percentiles"]) for row in report["rows"])
    assert summary["reference_flagged"] <= 0.2


def test_the_expert_steps_leave_the_weights_and_the_random_state_as_they_found_them(tmp_path):
    trainer = _trainer(tmp_path, dropout=0.1)  # dropout: the probes draw from torch's random state
    assert_filter_leaves_state_as_found(trainer)


def test_the_shallow_probe_leaves_torchs_random_state_as_it_found_it(tmp_path):
    trainer = _trainer(tmp_path, row_filter_expert_probe_steps=None)
    rng = torch.random.get_rng_state()
    run_row_filter(trainer, trainer.row_filter_args, trainer.reference_dataset, seed=0, progress=False)
    assert torch.equal(rng, torch.random.get_rng_state())


def test_the_expert_steps_train_a_causal_lm_probe_on_the_response_tokens(tmp_path):
    trainer = cue_answer_sft_trainer(tmp_path, row_filter_shallow_expert_weight=4.0, row_filter_expert_probe_steps=[3])
    trainer.train()
    report = json.loads((tmp_path / ROW_FILTER_FILE).read_text())
    assert report["summary"]["expert_probe_steps"] == [3]
    assert all(len(row["losses"]) == 3 for row in report["rows"])  # step 1, expert step 3, the shallow probe
