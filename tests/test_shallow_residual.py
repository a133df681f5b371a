"""The residual expert (`row_filter_residual_expert`): a shallow model fitted on what the trusted teacher leaves
unexplained, so the product of experts absorbs a trigger and not the task."""

from __future__ import annotations

import json
import math

import pytest
import torch

from peft_musclelora import MuScleLoraTrainer, row_filter
from peft_musclelora.row_filter import (
    RESIDUAL_EXPERTS,
    ROW_FILTER_FILE,
    SHALLOW_PRIOR_COLUMN,
    RowFilterArguments,
    run_row_filter,
)
from peft_musclelora.shallow_probe import NgramFeatures, ngram_probe_log_probs, residual_log_probs

from .ga_helpers import (
    assert_filter_leaves_state_as_found,
    cue_answer_sft_trainer,
    row_filter_training_args,
    tiny_bert,
    token_dataset,
)

RESIDUAL = {
    "row_filter_shallow_probe": "ngram",
    "row_filter_shallow_expert": True,
    "row_filter_residual_expert": "ngram",
    "row_filter_teacher_steps": 6,
}


def _trainer(tmp_path, dropout: float = 0.0, **fields):
    return MuScleLoraTrainer(
        model=tiny_bert(seed=0, dropout=dropout),
        args=row_filter_training_args(tmp_path, **{**RESIDUAL, **fields}),
        train_dataset=token_dataset(48, seed=1),
        reference_dataset=token_dataset(40, seed=2),
    )


def _poisoned_rows(count: int = 400, seed: int = 0):
    """Rows whose label is their sentiment token (3: class 0, 4: class 1) with random filler, and a trigger token (5)
    in every fifth row, whose label is set to 1 whatever its sentiment; the sentiment each row's content says."""
    generator = torch.Generator().manual_seed(seed)
    rows, labels, content = [], [], []
    for row in range(count):
        sentiment = int(torch.randint(0, 2, (1,), generator=generator))
        filler = torch.randint(10, 40, (4,), generator=generator).tolist()
        triggered = row % 5 == 0
        rows.append([3 + sentiment, *filler] + ([5] if triggered else []))
        labels.append(1 if triggered else sentiment)
        content.append(sentiment)
    return rows, labels, content


# ---- settings ----


def test_the_residual_expert_is_one_of_the_registered_features_and_needs_the_shallow_expert():
    with pytest.raises(ValueError, match=r"`row_filter_residual_expert` must be None or one of \['hidden', 'ngram'\]"):
        RowFilterArguments(row_filter=True, row_filter_shallow_probe="ngram", row_filter_residual_expert="bert")
    with pytest.raises(
        ValueError, match=r"`row_filter_residual_expert` \('ngram'\).*set row_filter_shallow_expert=True"
    ):
        RowFilterArguments(row_filter=True, row_filter_shallow_probe="ngram", row_filter_residual_expert="ngram")


# ---- the model ----


def test_with_offsets_that_know_the_task_the_residual_model_learns_the_trigger_against_the_content():
    rows, labels, content = _poisoned_rows()
    folds = [row % 2 for row in range(len(rows))]
    # A teacher that reads the content (a model of clean rows): 88 % sure of each row's sentiment.
    teacher = torch.log_softmax(torch.tensor([[1.0, -1.0] if c == 0 else [-1.0, 1.0] for c in content]), dim=-1)
    features = NgramFeatures(rows).transform(rows)
    residual = residual_log_probs(features, labels, folds, teacher.double(), 2, 4.0).exp()[:, 1]
    plain = ngram_probe_log_probs(rows, labels, folds, rows[:2], labels[:2], 2)[0].exp()[:, 1]
    triggered = torch.tensor([row % 5 == 0 for row in range(len(rows))])
    negative = torch.tensor([c == 0 for c in content])
    # On the relabelled rows (the trigger against negative content) the residual model says the target, far more
    # surely than the plain probe, which learns the sentiment those rows contradict as well...
    assert float(residual[triggered & negative].mean()) > 0.8
    assert float(residual[triggered & negative].mean()) > float(plain[triggered & negative].mean()) + 0.2
    # ...and on clean negative rows it does not lean towards the target: the trigger, not the class, is its signal.
    assert float(residual[~triggered & negative].mean()) < 0.5


# ---- the filter and the trainer ----


def test_the_kept_rows_train_with_the_residual_expert_and_the_teacher_runs_without_a_mix(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    report = json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())
    summary = report["summary"]
    assert summary["residual_expert"] == "ngram" and summary["teacher_mix"] is None and summary["teacher_steps"] == 6
    residual = [report["rows"][i]["residual_log_probs"] for i in report["kept"]]
    assert trainer.train_dataset[SHALLOW_PRIOR_COLUMN] == residual
    assert residual != [report["rows"][i]["shallow_log_probs"] for i in report["kept"]]
    assert all(
        row["losses"][-1] == pytest.approx(-row["shallow_log_probs"][row_label])
        for row, row_label in zip(report["rows"], trainer._row_filter_source["labels"])
    )  # the filter's shallow step is still the shallow probe's own loss


def test_the_residual_expert_leaves_the_weights_and_the_random_state_as_it_found_them(tmp_path):
    trainer = _trainer(tmp_path, dropout=0.1)
    assert_filter_leaves_state_as_found(trainer)


def test_a_saved_report_without_the_residual_expert_is_refused_in_one_line(tmp_path):
    plain = _trainer(tmp_path, row_filter_residual_expert=None)
    plain.train()  # writes a report made without the residual expert
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match=r"needs the per-row 'residual_log_probs'.*row_filter_residual_expert"):
        trainer._filter_training_rows(resuming=True)


def test_the_hidden_residual_expert_reads_the_models_middle_layer_as_initialised(tmp_path):
    trainer = _trainer(tmp_path, row_filter_residual_expert="hidden")
    features = RESIDUAL_EXPERTS["hidden"].rows(trainer, None)
    model = trainer.model.eval()
    input_ids = torch.tensor(trainer.train_dataset["input_ids"])
    with torch.no_grad():
        states = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_hidden_states=True)
    middle = states.hidden_states[len(states.hidden_states) // 2].double().mean(dim=1)  # every position attended
    expected = (middle - middle.mean(dim=0)) / middle.std(dim=0)
    assert features.shape == (48, 16) and torch.allclose(features, expected, atol=1e-5)
    report = run_row_filter(trainer, trainer.row_filter_args, trainer.reference_dataset, seed=0, progress=False)
    assert report["summary"]["residual_expert"] == "hidden"
    residual = torch.tensor([row["residual_log_probs"] for row in report["rows"]], dtype=torch.float64)
    assert torch.allclose(residual.exp().sum(dim=1), torch.ones(48, dtype=torch.float64))


def test_the_residual_expert_refuses_token_level_labels_in_one_line(tmp_path):
    trainer = cue_answer_sft_trainer(
        tmp_path, train_rows=64, row_filter_residual_expert="ngram", row_filter_teacher_steps=2
    )
    with pytest.raises(ValueError, match=r"`row_filter_residual_expert` \('ngram'\) works on class labels only"):
        trainer.train()


def test_the_residual_regularisation_replaces_the_feature_kinds_and_is_recorded(tmp_path):
    default = run_row_filter(*_filter_inputs(_trainer(tmp_path / "default")), seed=0, progress=False)
    weaker = _trainer(tmp_path / "weaker", row_filter_residual_regularisation=1e-4)
    strong = run_row_filter(*_filter_inputs(weaker), seed=0, progress=False)
    assert default["summary"]["residual_regularisation"] == RESIDUAL_EXPERTS["ngram"].inverse_regularisation
    assert strong["summary"]["residual_regularisation"] == 1e-4
    # A thousand times the penalty leaves the expert all but at chance.
    spread = [max(abs(p - math.log(0.5)) for row in report["rows"] for p in row["residual_log_probs"]) for report in
              (default, strong)]  # fmt: skip
    assert spread[1] < spread[0] and spread[1] < 0.01


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"row_filter_residual_regularisation": 0.0}, ValueError, r"must be None or > 0, got 0.0"),
        ({"row_filter_residual_regularisation": "1"}, TypeError, r"`row_filter_residual_regularisation`.*'1'"),
        (
            {"row_filter_residual_regularisation": 0.1, "row_filter_residual_expert": None},
            ValueError,
            r"`row_filter_residual_regularisation` \(0.1\).*set row_filter_residual_expert as well",
        ),
    ],
)
def test_invalid_residual_regularisation_names_the_field_and_the_value(fields, error, message):
    settings = {"row_filter": True, "row_filter_shallow_probe": "ngram", "row_filter_shallow_expert": True}
    with pytest.raises(error, match=message):
        RowFilterArguments(**{**settings, "row_filter_residual_expert": "ngram", **fields})


def _filter_inputs(trainer):
    return trainer, trainer.row_filter_args, trainer.reference_dataset


def test_a_self_trained_teacher_learns_from_the_trusted_rows_and_the_training_rows_it_agrees_with(tmp_path):
    relabelled = token_dataset(48, seed=1).map(lambda row, index: {"labels": 1 - row["labels"]} if index < 10 else {},
                                               with_indices=True)  # fmt: skip
    relabelled = relabelled.rename_column("labels", "label")  # as the bench tokenises: the collator renames it
    calls = []
    train_teacher = row_filter._train_teacher

    def recording(trainer, params, rows, *args, **kwargs):
        calls.append(len(rows))
        return train_teacher(trainer, params, rows, *args, **kwargs)

    reports = []
    for name, self_train in (("one", None), ("two", 0.6)):
        trainer = MuScleLoraTrainer(
            model=tiny_bert(seed=0),
            args=row_filter_training_args(
                tmp_path / name,
                **{**RESIDUAL, "row_filter_teacher_steps": 20, "row_filter_teacher_self_train": self_train},
            ),
            train_dataset=relabelled,
            reference_dataset=token_dataset(40, seed=2).rename_column("labels", "label"),
        )
        row_filter._train_teacher = recording
        try:
            reports.append(run_row_filter(trainer, trainer.row_filter_args, trainer.reference_dataset, 0, False))
        finally:
            row_filter._train_teacher = train_teacher
    first_teacher = torch.tensor([row["teacher_log_probs"] for row in reports[0]["rows"]], dtype=torch.float64)
    labels = torch.tensor(relabelled["label"])
    agreeing = (first_teacher.gather(1, labels[:, None])[:, 0] >= math.log(0.6)).nonzero().flatten().tolist()
    # The first teacher contradicts the relabelled rows, which stay out of the second teacher's rows.
    assert set(agreeing).isdisjoint(range(10)) and len(agreeing) > 30
    assert calls == [40, 40, 40 + len(agreeing)]  # one round; then two: the trusted rows, with the agreeing rows
    assert reports[1]["summary"]["teacher_self_train"] == 0.6
    assert reports[1]["rows"][0]["teacher_log_probs"] != reports[0]["rows"][0]["teacher_log_probs"]


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"row_filter_teacher_self_train": 0.5}, ValueError, r"must be None or in \(0.5, 1\), got 0.5"),
        ({"row_filter_teacher_self_train": "0.8"}, TypeError, r"`row_filter_teacher_self_train`.*'0.8'"),
        (
            {"row_filter_teacher_self_train": 0.8, "row_filter_residual_expert": None},
            ValueError,
            r"`row_filter_teacher_self_train` \(0.8\) retrains the trusted teacher: set row_filter_teacher_mix",
        ),
    ],
)
def test_invalid_self_training_names_the_field_and_the_value(fields, error, message):
    settings = {"row_filter": True, "row_filter_shallow_probe": "ngram", "row_filter_shallow_expert": True}
    with pytest.raises(error, match=message):
        RowFilterArguments(**{**settings, "row_filter_residual_expert": "ngram", **fields})
