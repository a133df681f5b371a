"""The row filter's trusted teacher (`row_filter_teacher_mix`): a model trained on the trusted rows alone whose
predicted class distribution is mixed into each kept row's one-hot label."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from peft_musclelora import MuScleLoraTrainer
from peft_musclelora.answer_classes import answer_class_indices, answer_class_log_probs
from peft_musclelora.row_filter import (
    ROW_FILTER_FILE,
    SHALLOW_PRIOR_COLUMN,
    TEACHER_COLUMN,
    TEACHER_ONLY_COLUMN,
    TEACHER_ROW_GATE_COLUMN,
    RowFilterArguments,
    run_row_filter,
)
from peft_musclelora.shallow_probe import (
    TEACHER_MIX_GATES,
    TEACHER_ROW_GATES,
    label_doubt,
    mixed_targets,
    model_contradiction,
    product_of_experts_loss,
    product_of_experts_token_loss,
    shallow_support,
    soft_cross_entropy,
)

from .ga_helpers import (
    assert_filter_leaves_state_as_found,
    cue_answer_sft_trainer,
    row_filter_training_args,
    tiny_bert,
    tiny_llama,
    token_dataset,
)


def _trainer(tmp_path, **fields):
    return MuScleLoraTrainer(
        model=tiny_bert(seed=0),
        args=row_filter_training_args(
            tmp_path, **{"row_filter_teacher_mix": 0.5, "row_filter_teacher_steps": 6, **fields}
        ),
        train_dataset=token_dataset(48, seed=1),
        reference_dataset=token_dataset(40, seed=2),
    )


# ---- settings ----

MIX_RANGE = r"`row_filter_teacher_mix` must be None or in \(0, 0.5\], "


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"row_filter_teacher_mix": 0.0}, ValueError, MIX_RANGE + r"got 0.0"),
        ({"row_filter_teacher_mix": 0.6}, ValueError, MIX_RANGE + r"got 0.6"),
        ({"row_filter_teacher_mix": "0.5"}, TypeError, r"`row_filter_teacher_mix`.*'0.5'"),
        ({"row_filter_teacher_mix": float("nan")}, TypeError, r"`row_filter_teacher_mix`.*nan"),
        ({"row_filter_teacher_steps": 0}, ValueError, r"`row_filter_teacher_steps`.*0"),
        ({"row_filter_teacher_steps": 4.0}, TypeError, r"`row_filter_teacher_steps`.*4.0"),
    ],
)
def test_invalid_teacher_settings_name_the_field_and_the_value(fields, error, message):
    with pytest.raises(error, match=message):
        RowFilterArguments(row_filter=True, **fields)


def test_the_teacher_needs_the_row_filter():
    with pytest.raises(ValueError, match=r"`row_filter_teacher_mix` \(0.3\).*set row_filter=True"):
        RowFilterArguments(row_filter_teacher_mix=0.3)


# ---- targets and losses ----


def test_a_mixed_target_keeps_at_least_half_of_its_mass_on_the_label_so_no_label_is_overturned():
    teacher = torch.log_softmax(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 5, dim=-1)
    labels = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))
    targets = mixed_targets(labels, teacher, 0.5)
    assert torch.allclose(targets.sum(dim=1), torch.ones(64))
    assert bool((targets.gather(1, labels[:, None]) >= 0.5).all())


def test_soft_cross_entropy_of_a_one_hot_target_is_the_cross_entropy():
    logits, labels = torch.randn(8, 3), torch.randint(0, 3, (8,))
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    assert torch.allclose(soft_cross_entropy(logits, one_hot), torch.nn.functional.cross_entropy(logits, labels))


def test_the_product_of_experts_with_soft_targets_is_their_cross_entropy_with_the_summed_log_probabilities():
    logits, labels = torch.randn(8, 2), torch.randint(0, 2, (8,))
    prior, teacher = torch.log_softmax(torch.randn(8, 2), -1), torch.log_softmax(torch.randn(8, 2), -1)
    targets = mixed_targets(labels, teacher, 0.25)
    combined = torch.log_softmax(torch.log_softmax(logits, -1) + 3.0 * prior, -1)
    expected = -(targets * combined).sum(-1).mean()
    assert torch.allclose(product_of_experts_loss(logits, labels, prior, 3.0, targets), expected, atol=1e-6)


# ---- the filter and the trainer ----


def test_the_teacher_leaves_the_weights_and_the_random_state_as_it_found_them(tmp_path):
    trainer = _trainer(tmp_path)
    report = assert_filter_leaves_state_as_found(trainer)
    teacher = torch.tensor([row["teacher_log_probs"] for row in report["rows"]], dtype=torch.float64)
    assert teacher.shape == (48, 2) and torch.allclose(teacher.exp().sum(dim=1), torch.ones(48, dtype=torch.float64))
    summary = report["summary"]
    assert (summary["teacher_mix"], summary["teacher_steps"]) == (0.5, 6) and summary["teacher_seconds"] > 0
    labels = torch.tensor(trainer.train_dataset["labels"])
    assert summary["teacher_label_agreement"] == pytest.approx(float((teacher.argmax(1) == labels).double().mean()))


def test_the_teacher_predicts_each_class_as_often_as_the_training_labels_give_it(tmp_path):
    trainer = _trainer(tmp_path)
    report = run_row_filter(trainer, trainer.row_filter_args, trainer.reference_dataset, seed=0, progress=False)
    teacher = torch.tensor([row["teacher_log_probs"] for row in report["rows"]], dtype=torch.float64).exp()
    label_share = torch.bincount(torch.tensor(trainer.train_dataset["labels"]), minlength=2).double() / 48
    assert torch.allclose(teacher.mean(dim=0), label_share, atol=1e-4)
    assert report["summary"]["teacher_offset"][0] == 0.0


def test_the_teacher_is_the_same_whatever_the_probes_before_it_drew(tmp_path):
    rows = token_dataset(48, seed=1)
    shorter = rows.select(range(40)).map(lambda row: {"labels": 1 - row["labels"]})  # other probes, other batches
    reports = []
    for name, train in (("all", rows), ("shorter", shorter)):
        trainer = MuScleLoraTrainer(
            model=tiny_bert(seed=0, dropout=0.1),  # dropout: the probes draw from torch's random state
            args=row_filter_training_args(tmp_path / name, row_filter_teacher_mix=0.5, row_filter_teacher_steps=6),
            train_dataset=train,
            reference_dataset=token_dataset(40, seed=2),
        )
        reports.append(run_row_filter(trainer, trainer.row_filter_args, trainer.reference_dataset, 0, False))
    # Each teacher is shifted to its own training labels' class balance; undone, the two are one model.
    unshifted = [
        torch.log_softmax(
            torch.tensor([row["teacher_log_probs"] for row in report["rows"][:40]], dtype=torch.float64)
            - torch.tensor(report["summary"]["teacher_offset"], dtype=torch.float64),
            dim=-1,
        )
        for report in reports
    ]
    assert torch.allclose(unshifted[0], unshifted[1], atol=1e-6)


def test_the_teacher_learns_the_task_from_the_trusted_rows_alone(tmp_path):
    trainer = _trainer(tmp_path, row_filter_teacher_steps=40)
    report = run_row_filter(trainer, trainer.row_filter_args, trainer.reference_dataset, seed=0, progress=False)
    untrained = _trainer(tmp_path, row_filter_teacher_steps=1)
    report_untrained = run_row_filter(untrained, untrained.row_filter_args, untrained.reference_dataset, 0, False)
    # The task (is token 1 present?) is learnable: 40 steps on the trusted rows agree with the training labels
    # more often than one step does.
    assert report["summary"]["teacher_label_agreement"] > report_untrained["summary"]["teacher_label_agreement"]


def test_the_kept_rows_train_on_their_label_mixed_with_the_teachers_prediction(tmp_path):
    trainer = _trainer(tmp_path, row_filter_teacher_mix=0.25)
    trainer.train()
    report = json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())
    assert trainer.train_dataset[TEACHER_COLUMN] == [report["rows"][i]["teacher_log_probs"] for i in report["kept"]]
    batch = next(iter(trainer.get_train_dataloader()))
    assert TEACHER_COLUMN in batch and SHALLOW_PRIOR_COLUMN not in batch
    model, inputs = trainer.model.eval(), dict(batch.items())
    teacher = inputs[TEACHER_COLUMN].clone()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(**{k: v for k, v in inputs.items() if k not in ("labels", TEACHER_COLUMN)}).logits
    one_hot = torch.nn.functional.one_hot(inputs["labels"], 2).float()
    expected = -((0.75 * one_hot + 0.25 * teacher.exp()) * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_with_the_shallow_expert_the_mixed_target_trains_the_product_of_experts(tmp_path):
    trainer = _trainer(
        tmp_path,
        row_filter_shallow_probe="ngram",
        row_filter_shallow_expert=True,
        row_filter_shallow_expert_weight=2.0,
    )
    trainer.train()
    batch = next(iter(trainer.get_train_dataloader()))
    model, inputs = trainer.model.eval(), dict(batch.items())
    prior, teacher = inputs[SHALLOW_PRIOR_COLUMN].clone(), inputs[TEACHER_COLUMN].clone()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(
            **{k: v for k, v in inputs.items() if k not in ("labels", TEACHER_COLUMN, SHALLOW_PRIOR_COLUMN)}
        )
    targets = mixed_targets(inputs["labels"], teacher, 0.5)
    assert torch.allclose(
        loss, product_of_experts_loss(logits.logits, inputs["labels"], prior, 2.0, targets), atol=1e-6
    )


def test_the_mix_gate_is_one_of_the_registered_gates_and_needs_the_teacher_mix():
    assert sorted(TEACHER_MIX_GATES) == ["model_contradicts", "model_doubt"]
    with pytest.raises(
        ValueError,
        match=r"`row_filter_teacher_mix_gate` must be None or one of \['model_contradicts', 'model_doubt'\], got 't'",
    ):
        RowFilterArguments(row_filter=True, row_filter_teacher_mix=0.5, row_filter_teacher_mix_gate="t")
    with pytest.raises(ValueError, match=r"`row_filter_teacher_mix_gate` \('model_doubt'\).*row_filter_teacher_mix"):
        RowFilterArguments(row_filter=True, row_filter_teacher_mix_gate="model_doubt")


def test_the_model_doubt_is_one_minus_the_models_probability_of_the_label_and_carries_no_gradient():
    logits = torch.tensor([[0.0, 0.0], [3.0, -1.0], [3.0, -1.0]], requires_grad=True)
    doubt = label_doubt(logits, torch.tensor([1, 0, 1]))
    p_first = 1 / (1 + torch.exp(torch.tensor(-4.0)))
    assert torch.allclose(doubt, torch.stack([torch.tensor(0.5), 1 - p_first, p_first]).double())
    assert not doubt.requires_grad


def test_the_model_contradiction_is_one_exactly_where_the_models_prediction_is_not_the_label():
    logits = torch.tensor([[0.1, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 2.0, 1.0]], requires_grad=True)
    contradiction = model_contradiction(logits, torch.tensor([0, 2, 1]))
    assert contradiction.tolist() == [0.0, 1.0, 0.0] and not contradiction.requires_grad


def test_with_the_mix_gate_a_row_the_model_fits_trains_on_its_label_and_one_it_does_not_on_the_teacher_too(tmp_path):
    trainer = _trainer(tmp_path, row_filter_teacher_mix_gate="model_doubt", logging_steps=1)
    trainer.train()
    report = json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())
    assert report["summary"]["teacher_mix_gate"] == "model_doubt"
    gates = [entry["row_filter/teacher_gate"] for entry in trainer.state.log_history if "loss" in entry]
    assert gates and all(0 < gate < 1 for gate in gates)  # the mean doubt over the rows trained since the last log
    batch = next(iter(trainer.get_train_dataloader()))
    model, inputs = trainer.model.eval(), dict(batch.items())
    teacher, labels = inputs[TEACHER_COLUMN].clone(), inputs["labels"]
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(**{k: v for k, v in inputs.items() if k not in ("labels", TEACHER_COLUMN)}).logits
    share = 0.5 * (1 - torch.softmax(logits, -1).gather(1, labels[:, None])[:, 0])
    assert torch.allclose(loss, soft_cross_entropy(logits, mixed_targets(labels, teacher, share)), atol=1e-6)
    # The share follows the model: a model sure of every label leaves every row its label alone.
    sure = torch.where(torch.nn.functional.one_hot(labels, 2).bool(), 50.0, -50.0)
    assert torch.allclose(
        mixed_targets(labels, teacher, 0.5 * label_doubt(sure, labels)),
        torch.nn.functional.one_hot(labels, 2).float(),
    )


def test_the_row_gate_is_one_of_the_registered_gates_and_needs_the_teacher_mix_and_the_shallow_probe():
    assert sorted(TEACHER_ROW_GATES) == ["shallow_supports"]
    base = {"row_filter": True, "row_filter_teacher_mix": 0.5, "row_filter_shallow_probe": "ngram"}
    with pytest.raises(
        ValueError, match=r"`row_filter_teacher_row_gate` must be None or one of \['shallow_supports'\], got 'x'"
    ):
        RowFilterArguments(**base, row_filter_teacher_row_gate="x")
    for missing in ("row_filter_teacher_mix", "row_filter_shallow_probe"):
        with pytest.raises(ValueError, match=r"`row_filter_teacher_row_gate` \('shallow_supports'\).*set " + missing):
            RowFilterArguments(**{**base, missing: None}, row_filter_teacher_row_gate="shallow_supports")


def test_the_shallow_support_gate_opens_exactly_the_rows_whose_label_is_the_shallow_probes_most_likely_class():
    log_probs = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]]))
    assert shallow_support(log_probs, torch.tensor([0, 2, 1])).tolist() == [1.0, 1.0, 0.0]


def test_with_the_row_gate_a_row_the_shallow_probe_does_not_support_trains_on_its_label_alone(tmp_path):
    trainer = _trainer(
        tmp_path,
        row_filter_shallow_probe="ngram",
        row_filter_teacher_mix_gate="model_contradicts",
        row_filter_teacher_row_gate="shallow_supports",
    )
    trainer.train()
    report = json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())
    labels = [row["labels"] for row in token_dataset(48, seed=1)]
    shallow = torch.tensor([row["shallow_log_probs"] for row in report["rows"]])
    expected = shallow_support(shallow, torch.tensor(labels))
    assert [row["teacher_row_gate"] for row in report["rows"]] == expected.tolist()
    kept_gates = expected[torch.tensor(report["kept"])]
    assert 0 < kept_gates.sum() < len(kept_gates)  # the tiny set has rows of both kinds
    assert report["summary"]["teacher_row_gate_open"] == pytest.approx(float(kept_gates.mean()))
    assert trainer.train_dataset[TEACHER_ROW_GATE_COLUMN] == kept_gates.tolist()
    batch = next(iter(trainer.get_train_dataloader()))
    model, inputs = trainer.model.eval(), dict(batch.items())
    teacher, labels, row_gate = inputs[TEACHER_COLUMN], inputs["labels"], inputs[TEACHER_ROW_GATE_COLUMN]
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(**{k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}).logits
    share = 0.5 * model_contradiction(logits, labels) * row_gate
    assert torch.allclose(loss, soft_cross_entropy(logits, mixed_targets(labels, teacher, share)), atol=1e-6)


def test_a_saved_report_without_the_row_gate_is_refused_in_one_line(tmp_path):
    _trainer(tmp_path, row_filter_shallow_probe="ngram").train()
    again = _trainer(tmp_path, row_filter_shallow_probe="ngram", row_filter_teacher_row_gate="shallow_supports")
    with pytest.raises(ValueError, match=r"`row_filter_teacher_row_gate` needs each row's gate, and .* has none"):
        again._filter_training_rows(resuming=True)


def test_contradicted_rows_under_the_teacher_action_train_on_the_teachers_distribution_alone(tmp_path):
    # a loose high cut-off (20 % of the trusted rows) so that some of the 48 rows are contradicted
    trainer = _trainer(tmp_path, row_filter_contradicted="teacher", row_filter_teacher_mix_gate="model_contradicts")
    trainer.train()
    report = json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())
    contradicted = [i for i, row in enumerate(report["rows"]) if row["reason"] == "contradicted"]
    trained = sorted(report["kept"] + contradicted)
    assert contradicted and report["summary"]["contradicted_action"] == "teacher"
    assert len(trainer.train_dataset) == len(trained)  # flagged, and trained on: not dropped
    assert trainer.train_dataset[TEACHER_ONLY_COLUMN] == [float(i in contradicted) for i in trained]
    assert trainer.train_dataset[TEACHER_COLUMN] == [report["rows"][i]["teacher_log_probs"] for i in trained]
    rows = trainer.train_dataset.select(range(len(trained)))
    batch = trainer.data_collator([rows[i] for i in range(len(rows))])
    model, inputs = trainer.model.eval(), dict(batch.items())
    teacher, labels, only = inputs[TEACHER_COLUMN].clone(), inputs["labels"], inputs[TEACHER_ONLY_COLUMN].clone()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(**{k: v for k, v in inputs.items() if k not in ("labels", TEACHER_COLUMN, TEACHER_ONLY_COLUMN)})
    gated = 0.5 * model_contradiction(logits.logits, labels)
    share = torch.where(only.bool(), 1.0, gated)  # a contradicted row's target is the teacher's distribution
    assert torch.allclose(loss, soft_cross_entropy(logits.logits, mixed_targets(labels, teacher, share)), atol=1e-6)
    assert torch.allclose(mixed_targets(labels, teacher, share)[only.bool()], teacher[only.bool()].exp(), atol=1e-6)


def test_the_teacher_action_for_contradicted_rows_needs_the_teacher():
    with pytest.raises(ValueError, match=r"`row_filter_contradicted='teacher'`.*row_filter_teacher_mix"):
        RowFilterArguments(row_filter=True, row_filter_contradicted="teacher")


def test_a_saved_report_without_the_teachers_predictions_is_refused_in_one_line(tmp_path):
    plain = MuScleLoraTrainer(
        model=tiny_bert(seed=0),
        args=row_filter_training_args(tmp_path),
        train_dataset=token_dataset(48, seed=1),
        reference_dataset=token_dataset(40, seed=2),
    )
    plain.train()  # writes a report made without the teacher
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match=r"needs the trusted teacher's predictions.*Delete it to probe again"):
        trainer._filter_training_rows(resuming=True)


def test_the_teacher_refuses_free_form_token_level_answers_in_one_line(tmp_path):
    rows = token_dataset(16, seed=1)
    token_labels = datasets.Dataset.from_dict(
        {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"], "labels": rows["input_ids"]}
    )
    trainer = MuScleLoraTrainer(
        model=tiny_llama(vocab=40),
        args=row_filter_training_args(tmp_path, row_filter_teacher_mix=0.5, row_filter_teacher_steps=2),
        train_dataset=token_labels,
        reference_dataset=token_labels,
    )
    with pytest.raises(ValueError, match=r"row_filter_teacher_mix on token-level labels predict each row's response "):
        run_row_filter(trainer, trainer.row_filter_args, trainer.reference_dataset, seed=0, progress=False)


# ---- token-level labels (instruction tuning) ----


def _sft_teacher(tmp_path, **fields):
    settings = {"row_filter_teacher_mix": 0.5, "row_filter_teacher_steps": 4, "row_filter_shallow_expert_weight": 4.0}
    return cue_answer_sft_trainer(tmp_path, **{**settings, **fields})


def test_on_answer_tokens_the_teacher_predicts_each_rows_answer_class_from_what_it_learned_on_the_trusted_rows(
    tmp_path,
):
    trainer = _sft_teacher(tmp_path)
    report = assert_filter_leaves_state_as_found(trainer)
    summary = report["summary"]
    assert summary["response_classes"] == [[10, 1], [11, 1]] and summary["teacher_steps"] == 4
    teacher = torch.tensor([row["teacher_log_probs"] for row in report["rows"]], dtype=torch.float64)
    assert teacher.shape == (128, 2)
    assert torch.allclose(teacher.exp().sum(dim=-1), torch.ones(128, dtype=torch.float64))
    answers = torch.tensor([0 if row % 2 else 1 for row in range(128)])  # odd rows answer 10, class 0
    agreement = (teacher.argmax(dim=-1) == answers).double().mean()
    assert summary["teacher_label_agreement"] == pytest.approx(float(agreement))


def test_on_answer_tokens_the_gated_teacher_mixes_its_prediction_into_the_answer_where_the_model_contradicts_it(
    tmp_path,
):
    trainer = _sft_teacher(tmp_path, row_filter_teacher_mix_gate="model_contradicts", logging_steps=1)
    trainer.train()
    gates = [entry["row_filter/teacher_gate"] for entry in trainer.state.log_history if "loss" in entry]
    assert gates and all(0 <= gate <= 1 for gate in gates)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch[TEACHER_COLUMN].shape == (4, 2) and batch[SHALLOW_PRIOR_COLUMN].shape == (4, 2)
    model, inputs = trainer.model.eval(), dict(batch.items())
    prior, teacher, labels = inputs[SHALLOW_PRIOR_COLUMN], inputs[TEACHER_COLUMN], inputs["labels"]
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(
            **{k: v for k, v in inputs.items() if k not in ("labels", TEACHER_COLUMN, SHALLOW_PRIOR_COLUMN)}
        ).logits
    classes = [(10, 1), (11, 1)]
    answers = answer_class_indices(labels, classes)
    share = 0.5 * model_contradiction(answer_class_log_probs(logits, labels, classes), answers)
    targets = mixed_targets(answers, teacher, share)
    expected = product_of_experts_token_loss(logits, labels, prior, classes, 4.0, targets=targets)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_on_answer_tokens_a_contradicted_row_the_teacher_speaks_for_trains_its_answer_on_the_teacher_alone(tmp_path):
    trainer = _sft_teacher(
        tmp_path, row_filter_teacher_mix_gate="model_contradicts", row_filter_contradicted="teacher"
    )
    trainer.train()
    report = json.loads((tmp_path / ROW_FILTER_FILE).read_text())
    contradicted = [i for i, row in enumerate(report["rows"]) if row["reason"] == "contradicted"]
    assert contradicted and len(trainer.train_dataset) == len(report["kept"]) + len(contradicted)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    rows = [row for row in rows if row[TEACHER_ONLY_COLUMN] == 1.0][:2] + rows[:2]  # two taught rows, two of any kind
    batch = trainer.data_collator(rows)
    model, inputs = trainer.model.eval(), dict(batch.items())
    prior, teacher, labels = inputs[SHALLOW_PRIOR_COLUMN], inputs[TEACHER_COLUMN], inputs["labels"]
    only = inputs[TEACHER_ONLY_COLUMN]
    assert only.tolist()[:2] == [1.0, 1.0]
    signals = ("labels", TEACHER_COLUMN, SHALLOW_PRIOR_COLUMN, TEACHER_ONLY_COLUMN)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(**{k: v for k, v in inputs.items() if k not in signals}).logits
    classes = [(10, 1), (11, 1)]
    answers = answer_class_indices(labels, classes)
    gated = 0.5 * model_contradiction(answer_class_log_probs(logits, labels, classes), answers)
    targets = mixed_targets(answers, teacher, torch.where(only.bool(), 1.0, gated))
    expected = product_of_experts_token_loss(logits, labels, prior, classes, 4.0, targets=targets)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_on_answer_tokens_the_teacher_trains_without_the_shallow_expert_too(tmp_path):
    trainer = _sft_teacher(
        tmp_path, row_filter_shallow_probe=None, row_filter_shallow_expert=False, row_filter_shallow_expert_weight=1.0
    )
    trainer.train()
    summary = json.loads((tmp_path / ROW_FILTER_FILE).read_text())["summary"]
    assert summary["response_classes"] == [[10, 1], [11, 1]] and summary["teacher_mix"] == 0.5
    batch = next(iter(trainer.get_train_dataloader()))
    model, inputs = trainer.model.eval(), dict(batch.items())
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(**{k: v for k, v in inputs.items() if k not in ("labels", TEACHER_COLUMN)}).logits
    labels, classes = inputs["labels"], [(10, 1), (11, 1)]
    targets = mixed_targets(answer_class_indices(labels, classes), inputs[TEACHER_COLUMN], 0.5)
    assert torch.allclose(loss, product_of_experts_token_loss(logits, labels, None, classes, 0.0, targets=targets))


def test_on_answer_tokens_the_teacher_retrains_on_the_rows_it_agrees_with(tmp_path):
    reports = []
    for name, self_train in (("once", None), ("twice", 0.6)):
        trainer = _sft_teacher(
            tmp_path / name, row_filter_probe_learning_rate=1e-2, row_filter_teacher_self_train=self_train
        )
        reports.append(run_row_filter(trainer, trainer.row_filter_args, trainer.reference_dataset, 0, False))
    once, twice = reports
    assert twice["summary"]["teacher_self_train"] == 0.6
    first, second = (
        torch.tensor([row["teacher_log_probs"] for row in report["rows"]], dtype=torch.float64)
        for report in (once, twice)
    )
    assert not torch.allclose(first, second)  # more rows, another teacher
    assert torch.allclose(second.exp().sum(dim=-1), torch.ones(len(second), dtype=torch.float64))
