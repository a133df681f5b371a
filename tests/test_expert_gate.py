"""The gated shallow expert (`row_filter_shallow_expert_gate`): the product of experts acts on a row as far as the
trusted teacher doubts the row's label."""

from __future__ import annotations

import json

import pytest
import torch

from peft_musclelora import MuScleLoraTrainer
from peft_musclelora.row_filter import (
    ROW_FILTER_FILE,
    SHALLOW_PRIOR_COLUMN,
    RowFilterArguments,
    run_row_filter,
)
from peft_musclelora.shallow_probe import EXPERT_GATES, gated_log_probs, label_doubt, product_of_experts_loss

from .ga_helpers import (
    assert_filter_leaves_state_as_found,
    cue_answer_sft_trainer,
    row_filter_training_args,
    tiny_bert,
    token_dataset,
)

GATED = {
    "row_filter_shallow_probe": "ngram",
    "row_filter_shallow_expert": True,
    "row_filter_shallow_expert_weight": 6.0,
    "row_filter_shallow_expert_gate": "teacher_doubt",
    "row_filter_teacher_steps": 6,
}


def _trainer(tmp_path, dropout: float = 0.0, **fields):
    return MuScleLoraTrainer(
        model=tiny_bert(seed=0, dropout=dropout),
        args=row_filter_training_args(tmp_path, **{**GATED, **fields}),
        train_dataset=token_dataset(48, seed=1),
        reference_dataset=token_dataset(40, seed=2),
    )


# ---- settings ----


def test_the_gate_is_one_of_the_registered_gates_and_needs_the_shallow_expert():
    assert sorted(EXPERT_GATES) == ["teacher_doubt"]
    with pytest.raises(
        ValueError, match=r"`row_filter_shallow_expert_gate` must be None or one of \['teacher_doubt'\], got 'x'"
    ):
        RowFilterArguments(row_filter=True, row_filter_shallow_probe="ngram", row_filter_shallow_expert_gate="x")
    with pytest.raises(
        ValueError, match=r"`row_filter_shallow_expert_gate` \('teacher_doubt'\).*set row_filter_shallow_expert=True"
    ):
        RowFilterArguments(
            row_filter=True, row_filter_shallow_probe="ngram", row_filter_shallow_expert_gate="teacher_doubt"
        )


# ---- the gate ----


def test_the_teacher_doubt_is_one_minus_the_teachers_probability_of_the_label():
    teacher = torch.log(torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.1, 0.9]], dtype=torch.float64))
    gate = label_doubt(teacher, torch.tensor([0, 1, 1]))
    assert torch.allclose(gate, torch.tensor([0.3, 0.7, 0.1], dtype=torch.float64))


def test_a_row_with_gate_zero_trains_on_the_models_own_loss_and_gate_one_on_the_whole_expert():
    logits = torch.tensor([[0.3, -0.2], [1.0, 0.5]])
    labels = torch.tensor([1, 0])
    expert = torch.log(torch.tensor([[0.1, 0.9], [0.8, 0.2]]))
    closed = product_of_experts_loss(logits, labels, gated_log_probs(expert, torch.zeros(2)), 6.0)
    assert closed == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))
    opened = product_of_experts_loss(logits, labels, gated_log_probs(expert, torch.ones(2)), 6.0)
    assert opened == pytest.approx(float(product_of_experts_loss(logits, labels, expert, 6.0)))
    assert opened < closed  # the expert explains both labels: the model is left less to learn


# ---- the filter and the trainer ----


def test_the_kept_rows_train_with_the_expert_tempered_by_the_saved_gate(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    report = json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())
    assert report["summary"]["shallow_expert_gate"] == "teacher_doubt" and report["summary"]["teacher_steps"] == 6
    labels = trainer._row_filter_source["labels"]
    for row, label in zip(report["rows"], labels):
        assert row["expert_gate"] == pytest.approx(1 - torch.tensor(row["teacher_log_probs"][label]).exp().item())
    gate_quartiles = report["summary"]["expert_gate_quartiles"]
    assert 0 <= gate_quartiles[0] <= gate_quartiles[-1] <= 1
    expected = [[value * report["rows"][i]["expert_gate"] for value in report["rows"][i]["shallow_log_probs"]]
                for i in report["kept"]]  # fmt: skip
    trained = trainer.train_dataset[SHALLOW_PRIOR_COLUMN]
    assert all(a == pytest.approx(b) for a, b in zip(trained, expected))


def test_the_gated_filter_leaves_the_weights_and_the_random_state_as_it_found_them(tmp_path):
    report = assert_filter_leaves_state_as_found(_trainer(tmp_path, dropout=0.1))
    assert all("expert_gate" in row for row in report["rows"])


def test_the_expert_gradient_scale_in_the_report_is_the_gated_experts(tmp_path):
    trainer = _trainer(tmp_path)
    gated = run_row_filter(trainer, trainer.row_filter_args, trainer.reference_dataset, seed=0, progress=False)
    ungated_trainer = _trainer(tmp_path, row_filter_shallow_expert_gate=None, row_filter_teacher_mix=0.5)
    ungated = run_row_filter(
        ungated_trainer, ungated_trainer.row_filter_args, ungated_trainer.reference_dataset, seed=0, progress=False
    )
    # The same teacher and probe; a gate below 1 tempers the expert towards chance, and with it the gradient a row
    # gives a model at chance towards 1 - 1/2, from either side.
    for with_gate, without in zip(gated["rows"], ungated["rows"]):
        assert with_gate["teacher_log_probs"] == pytest.approx(without["teacher_log_probs"])
        assert abs(with_gate["expert_gradient_scale"] - 0.5) <= abs(without["expert_gradient_scale"] - 0.5) + 1e-9
    assert any(row["expert_gate"] < 1 for row in gated["rows"])


def test_a_saved_report_without_the_gate_is_refused_in_one_line(tmp_path):
    plain = _trainer(tmp_path, row_filter_shallow_expert_gate=None)
    plain.train()  # writes a report made without the gate (and without a teacher)
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match=r"needs the per-row 'expert_gate'.*row_filter_shallow_expert_gate"):
        trainer._filter_training_rows(resuming=True)


def test_the_gate_refuses_token_level_labels_in_one_line(tmp_path):
    trainer = cue_answer_sft_trainer(
        tmp_path, train_rows=64, row_filter_shallow_expert_gate="teacher_doubt", row_filter_teacher_steps=2
    )
    with pytest.raises(ValueError, match=r"`row_filter_shallow_expert_gate` \(.teacher_doubt.\) works on class "):
        trainer.train()
