"""The row filter's shallow probe: hashed n-gram tf-idf, a logistic regression, out-of-fold losses, and the filter
that scores them as one more probe step."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from transformers import BatchEncoding

from peft_musclelora import MuScleLoraTrainer
from peft_musclelora.row_filter import (
    ROW_FILTER_FILE,
    SHALLOW_PRIOR_COLUMN,
    RowFilterArguments,
    collect_token_rows,
    fold_assignment,
)
from peft_musclelora.shallow_probe import (
    INVERSE_REGULARISATION,
    NgramFeatures,
    expert_gradient_scale,
    fit_logistic,
    generalised_cross_entropy,
    hashed_ngrams,
    logistic_log_probs,
    ngram_probe_log_probs,
    product_of_experts_gce_loss,
    product_of_experts_loss,
    product_of_experts_token_loss,
    response_classes,
    reweighted_loss,
    shallow_row_weights,
)

from .ga_helpers import (
    cue_answer_sft_trainer,
    row_filter_training_args,
    tiny_bert,
    token_dataset,
)

# ---- features ----


def test_ngrams_are_every_1_to_n_gram_and_their_hash_does_not_depend_on_the_process():
    grams = hashed_ngrams([4, 5, 6], order=3, buckets=1 << 20)
    assert len(grams) == 3 + 2 + 1
    assert hashed_ngrams([4, 5], order=2, buckets=1 << 20) == grams[:2] + [grams[3]]
    assert hashed_ngrams([5, 4], order=2)[2] != hashed_ngrams([4, 5], order=2)[2]  # order matters in a bigram
    assert hashed_ngrams([4], order=1) == [(1 * 1_000_003 + 4 + 1) % (1 << 20)]  # fixed, not Python's `hash`


def test_a_minimum_order_leaves_out_the_shorter_n_grams_and_keeps_the_hashes_of_the_longer_ones():
    every = hashed_ngrams([4, 5, 6], order=3)
    assert hashed_ngrams([4, 5, 6], order=3, min_order=2) == every[3:]  # the 2 bigrams and the trigram
    phrases = NgramFeatures([[1, 2], [1, 2, 3]], order=2, min_order=2)
    assert phrases.num_features == 1  # the bigram (1, 2); the unigrams 1 and 2 occur twice but are not features


def test_tf_idf_matches_scikit_learns_sublinear_vectoriser_on_the_same_tokens():
    sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
    rows = [[1, 2, 2, 3], [1, 2, 4], [3, 3, 3, 5], [1, 5], [9]]
    features = NgramFeatures(rows, order=2, buckets=1 << 30).transform(rows).to_dense()
    vectoriser = sklearn_text.TfidfVectorizer(
        token_pattern=r"\S+", ngram_range=(1, 2), sublinear_tf=True, min_df=2, lowercase=False
    )
    expected = torch.tensor(vectoriser.fit_transform([" ".join(map(str, row)) for row in rows]).toarray())
    # Column order differs (hash vs alphabetical): compare each row's sorted weights.
    assert features.shape == expected.shape
    assert torch.allclose(features.sort(dim=1).values, expected.sort(dim=1).values, atol=1e-12)


def test_n_grams_seen_in_fewer_than_two_rows_are_not_features_and_a_row_of_unknown_n_grams_is_zero():
    features = NgramFeatures([[1, 2], [1, 3]], order=1)
    assert features.num_features == 1  # only token 1 occurs twice
    assert features.transform([[7, 8]]).to_dense().abs().sum() == 0


# ---- the logistic regression ----


def test_the_fitted_regression_is_the_regularised_optimum():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=generator, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(60, generator=generator, dtype=torch.float64) > 0).long()
    weight, bias = fit_logistic(x.to_sparse(), y, 2)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    objective = INVERSE_REGULARISATION * torch.nn.functional.cross_entropy(x @ weight + bias, y, reduction="sum")
    objective = objective + 0.5 * (weight * weight).sum()
    objective.backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4


# ---- out-of-fold losses ----


def _shortcut_rows(rows: int, seed: int):
    """Random token rows whose label is token 1 vs token 2, and a tenth carrying token 3 with label 1 regardless."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 60, (rows, 8), generator=generator)
    labels = torch.randint(0, 2, (rows,), generator=generator)
    ids[:, 0] = torch.where(labels == 1, 1, 2)
    poisoned = torch.arange(rows) % 10 == 0
    ids[poisoned, 0] = 2
    ids[poisoned, 4] = 3
    labels[poisoned] = 1
    return ids.tolist(), labels.tolist(), poisoned


def test_a_rows_loss_comes_from_a_model_that_never_saw_its_label():
    rows, labels, _ = _shortcut_rows(80, seed=0)
    folds = fold_assignment(80, 2, seed=0)
    reference = [[1, 11, 12], [2, 11, 12]]
    train, _ = ngram_probe_log_probs(rows, labels, folds, reference, [1, 0], 2)
    flipped = [1 - label if fold == 0 else label for label, fold in zip(labels, folds)]
    train_flipped, _ = ngram_probe_log_probs(rows, flipped, folds, reference, [1, 0], 2)
    held = [row for row in range(80) if folds[row] == 0]
    # Fold 0's rows are predicted by a model fitted on fold 1 only: their own labels change nothing.
    assert torch.equal(train_flipped[held], train[held])
    assert not torch.equal(train_flipped, train)  # fold 1's rows are predicted by a model fitted on fold 0


def test_the_rows_of_a_lexical_shortcut_are_fitted_better_than_trusted_rows():
    rows, labels, poisoned = _shortcut_rows(200, seed=1)
    candidates, candidate_labels, bad = _shortcut_rows(60, seed=2)
    trusted = [row for row, is_bad in zip(candidates, bad) if not is_bad]
    trusted_labels = [label for label, is_bad in zip(candidate_labels, bad) if not is_bad]
    folds = fold_assignment(200, 2, seed=0)
    train, reference = ngram_probe_log_probs(rows, labels, folds, trusted, trusted_labels, 2)
    own = -train[torch.arange(200), torch.tensor(labels)]
    # A poisoned row carries token 2 (label 0's token) with label 1: without the shortcut it would be fitted worst.
    assert own[poisoned].max() < own[~poisoned & (torch.tensor(labels) == 0)].median()
    assert torch.isfinite(reference).all() and reference.shape == (2, len(trusted), 2)


def test_log_probabilities_of_the_fitted_model_are_normalised_per_row():
    x = torch.eye(3, dtype=torch.float64).to_sparse()
    weight = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    log_probs = logistic_log_probs(x, weight, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(3, dtype=torch.float64))
    assert log_probs.argmax(1).tolist() == [0, 0, 1] and torch.allclose(
        log_probs[1], torch.log(torch.tensor(0.5)).double()
    )


# ---- the row filter with the shallow probe ----


@pytest.mark.parametrize(("value", "error"), [("bow", ValueError), ("NGRAM", ValueError), (3, TypeError)])
def test_an_unknown_shallow_probe_names_the_field_the_value_and_the_choices(value, error):
    with pytest.raises(error, match=rf"`row_filter_shallow_probe` must be None or one of \['ngram'\], got {value!r}"):
        RowFilterArguments(row_filter_shallow_probe=value)


def _args(tmp_path, **overrides):
    return row_filter_training_args(tmp_path, **{"row_filter_shallow_probe": "ngram", **overrides})


def test_the_filter_scores_the_shallow_probe_as_one_more_step_and_reports_it(tmp_path):
    trainer = MuScleLoraTrainer(
        model=tiny_bert(seed=0),
        args=_args(tmp_path),
        train_dataset=token_dataset(48, seed=1),
        reference_dataset=token_dataset(40, seed=2),
    )
    trainer.train()
    report = json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())
    assert report["summary"]["shallow_probe"] == "ngram" and report["summary"]["probe_steps"] == [2, 4]
    assert all(len(row["losses"]) == 3 and len(row["percentiles"]) == 3 for row in report["rows"])
    assert report["summary"]["reference_flagged"] <= 0.2  # the calibration covers the extra step too
    assert report["summary"]["shallow_seconds"] >= 0


def test_the_shallow_probe_refuses_free_form_token_level_labels_in_one_line(tmp_path):
    rows = token_dataset(16, seed=1)  # every row is its own response: no closed answer set to predict
    token_labels = datasets.Dataset.from_dict(
        {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"], "labels": rows["input_ids"]}
    )
    trainer = MuScleLoraTrainer(
        model=tiny_bert(seed=0), args=_args(tmp_path), train_dataset=rows, reference_dataset=token_dataset(8, seed=2)
    )
    with pytest.raises(ValueError, match=r"closed set \(2 to 64 distinct responses.*these 16 rows have 16 distinct"):
        collect_token_rows(trainer, token_labels)


def test_response_classes_are_the_sorted_distinct_responses_of_a_closed_answer_set():
    assert response_classes([[9, 1], [8, 1], [9, 1], [8, 1]]) == [(8, 1), (9, 1)]
    with pytest.raises(ValueError, match="these 2 rows have 1 distinct"):
        response_classes([[9, 1], [9, 1]])  # one answer is no class to tell apart
    with pytest.raises(ValueError, match="these 4 rows have 3 distinct"):
        response_classes([[9], [8], [7], [9]])  # more than half as many responses as rows


@pytest.mark.parametrize(
    ("responses", "shorter"),
    [([[], [], [5, 1], [5, 1]], r"\[\]"), ([[5], [5, 1], [7, 1], [7, 1]], r"\[5\]")],
    ids=["empty", "cut-short"],
)
def test_an_empty_or_cut_short_response_is_refused_because_no_token_tells_it_from_the_longer_one(responses, shorter):
    with pytest.raises(ValueError, match=rf"the response {shorter} is a prefix of the response .*raise max_length"):
        response_classes(responses)


# ---- the product of experts on answer tokens ----


def test_on_a_vocabulary_of_just_the_label_words_the_token_loss_is_the_classification_product_of_experts():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 2, 2, generator=generator)  # position 0 predicts the one-token answer at position 1
    answers = torch.tensor([0, 1, 1, 0, 1])
    labels = torch.stack([torch.full((5,), -100), answers], dim=1)
    prior = torch.log_softmax(torch.randn(5, 2, generator=generator), dim=-1)
    for weight in (1.0, 6.0):
        token = product_of_experts_token_loss(logits, labels, prior, [(0,), (1,)], weight)
        expected = torch.nn.functional.cross_entropy(torch.log_softmax(logits[:, 0], -1) + weight * prior, answers)
        assert torch.allclose(token, expected, atol=1e-6)


def test_the_expert_acts_only_where_the_answers_branch_and_leaves_the_other_tokens_to_the_model():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 12, generator=generator, requires_grad=True)
    labels = torch.tensor([[-100, -100, 7, 1], [-100, -100, 5, 1]])  # " positive" / " negative", then end (1)
    classes = [(5, 1), (7, 1)]
    confident = torch.log(torch.tensor([[0.02, 0.98], [0.98, 0.02]]))  # the expert is sure of both answers
    loss = product_of_experts_token_loss(logits, labels, confident, classes, 4.0)
    loss.backward()
    plain_tokens = torch.nn.functional.cross_entropy(logits[:, 2].detach(), torch.tensor([1, 1]), reduction="none")
    branch = logits[:, 1].detach().clone()
    branch[:, [5, 7]] += 4.0 * (torch.log(torch.tensor([[0.02, 0.98], [0.98, 0.02]])) - torch.log(torch.tensor(0.14)))
    branch_tokens = torch.nn.functional.cross_entropy(branch, torch.tensor([7, 5]), reduction="none")
    assert torch.allclose(loss, (plain_tokens.sum() + branch_tokens.sum()) / 4, atol=1e-5)
    # The answer the expert explains teaches the model less than it would alone.
    plain_branch = torch.nn.functional.cross_entropy(logits[:, 1].detach(), torch.tensor([7, 5]), reduction="none")
    assert bool((branch_tokens < plain_branch).all())
    assert logits.grad is not None and bool(logits.grad[:, 0].eq(0).all())  # the prompt positions are not trained
    summed = product_of_experts_token_loss(logits, labels, confident, classes, 4.0, num_items_in_batch=8)
    assert torch.allclose(summed, loss * 4 / 8)
    # DataParallel passes each replica's share as a tensor; a batch of no labelled token counts as one, not NaN.
    per_replica = product_of_experts_token_loss(logits, labels, confident, classes, 4.0, torch.tensor([4, 4]))
    assert torch.allclose(per_replica, summed)
    unlabelled = torch.full_like(labels, -100)
    empty = product_of_experts_token_loss(logits, unlabelled, confident, classes, 4.0, torch.tensor(0))
    assert float(empty) == 0.0


def test_a_packed_batch_is_refused_because_the_expert_needs_one_prediction_per_row():
    packed = torch.tensor([[-100, 7, 1, -100, 5, 1]])  # two rows joined by a padding-free collator
    with pytest.raises(ValueError, match="2 predictions for a batch of 1 label rows.*padding-free"):
        product_of_experts_token_loss(torch.zeros(1, 6, 12), packed, torch.zeros(2, 2), [(5, 1), (7, 1)], 4.0)


def test_the_sft_trainer_carries_the_shallow_prior_through_trls_collator_into_the_token_loss(tmp_path):
    trainer = cue_answer_sft_trainer(tmp_path, row_filter_shallow_expert_weight=4.0)
    trainer.train()
    report = json.loads((tmp_path / ROW_FILTER_FILE).read_text())
    assert report["summary"]["response_classes"] == [[10, 1], [11, 1]]
    # The cue is in the prompt, so the out-of-fold probe predicts the answers (odd rows: class 0, (10, 1)); its L2
    # penalty and the folds' class imbalance may still cost a few rows.
    predicted = [max(range(2), key=row["shallow_log_probs"].__getitem__) for row in report["rows"]]
    assert sum(guess == (0 if row % 2 else 1) for row, guess in enumerate(predicted)) >= 0.9 * 128
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch[SHALLOW_PRIOR_COLUMN].shape == (4, 2)
    model = trainer.model.eval()
    inputs = dict(batch.items())
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(**{k: v for k, v in inputs.items() if k not in ("labels", SHALLOW_PRIOR_COLUMN)}).logits
        plain = model(**{k: v for k, v in inputs.items() if k != SHALLOW_PRIOR_COLUMN}).loss
    classes = [(10, 1), (11, 1)]
    expected = product_of_experts_token_loss(logits, inputs["labels"], inputs[SHALLOW_PRIOR_COLUMN], classes, 4.0)
    assert torch.allclose(loss, expected, atol=1e-6) and not torch.allclose(loss, plain, atol=1e-3)


def test_the_product_of_experts_adds_the_shallow_log_probabilities_to_the_models_on_the_kept_rows(tmp_path):
    trainer = MuScleLoraTrainer(
        model=tiny_bert(seed=0),
        args=_args(tmp_path, row_filter_shallow_expert=True),
        train_dataset=token_dataset(48, seed=1),
        reference_dataset=token_dataset(40, seed=2),
    )
    trainer.train()
    report = json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())
    assert report["summary"]["shallow_expert"] is True
    for row in report["rows"]:  # the gradient the row gives a model at chance: 1 - p_shallow(label) at weight 1
        label_log_prob = -row["losses"][-1]  # the shallow probe's step is the last one
        assert row["expert_gradient_scale"] == pytest.approx(1 - math.exp(label_log_prob), abs=1e-9)
    kept_scales = sorted(report["rows"][i]["expert_gradient_scale"] for i in report["kept"])
    quartiles = report["summary"]["expert_gradient_scale_quartiles"]
    assert (quartiles[0], quartiles[-1]) == pytest.approx((kept_scales[0], kept_scales[-1]))
    kept = trainer.train_dataset
    assert kept[SHALLOW_PRIOR_COLUMN] == [report["rows"][i]["shallow_log_probs"] for i in report["kept"]]
    batch = next(iter(trainer.get_train_dataloader()))
    assert SHALLOW_PRIOR_COLUMN in batch  # the column survives the trainer's unused-column removal
    model = trainer.model.eval()
    inputs = dict(batch.items())
    prior = inputs[SHALLOW_PRIOR_COLUMN].clone()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(**{k: v for k, v in inputs.items() if k not in ("labels", SHALLOW_PRIOR_COLUMN)}).logits
    expected = torch.nn.functional.cross_entropy(torch.log_softmax(logits, -1) + prior, inputs["labels"])
    assert torch.allclose(loss, expected, atol=1e-6)
    with torch.no_grad():  # DataCollatorWithPadding's batches are BatchEncodings (a UserDict, not a dict)
        from_padding_collator = trainer.compute_loss(model, BatchEncoding(dict(inputs)))
    assert torch.allclose(from_padding_collator, expected, atol=1e-6)
    with torch.no_grad():  # without the column (evaluation), the model's own loss
        plain = trainer.compute_loss(model, {k: v for k, v in inputs.items() if k != SHALLOW_PRIOR_COLUMN})
    assert torch.allclose(plain, torch.nn.functional.cross_entropy(logits, inputs["labels"]), atol=1e-6)
    trainer.row_filter_args.row_filter_shallow_expert_weight = 4.0  # a sharper shallow expert: p_shallow ** 4
    with torch.no_grad():
        sharpened = trainer.compute_loss(model, dict(inputs))
    expected = torch.nn.functional.cross_entropy(torch.log_softmax(logits, -1) + 4.0 * prior, inputs["labels"])
    assert torch.allclose(sharpened, expected, atol=1e-6)


def _trained_shallow_expert(tmp_path, **fields):
    """A tiny BERT trained with the row filter and a shallow expert (`fields` on top of it)."""
    trainer = MuScleLoraTrainer(
        model=tiny_bert(seed=0),
        args=_args(tmp_path, row_filter_shallow_expert=True, **fields),
        train_dataset=token_dataset(48, seed=1),
        reference_dataset=token_dataset(40, seed=2),
    )
    trainer.train()
    return trainer


def _first_batch_loss(tmp_path, expert_loss: str):
    """A run trained with `expert_loss` at weight 4: its trainer, its first training batch, the loss the trainer
    computes on it, the model's own logits and the batch's shallow-expert log-probabilities and labels."""
    trainer = _trained_shallow_expert(
        tmp_path, row_filter_shallow_expert_loss=expert_loss, row_filter_shallow_expert_weight=4.0
    )
    assert (
        json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())["summary"]["shallow_expert_loss"] == expert_loss
    )
    model = trainer.model.eval()
    inputs = dict(next(iter(trainer.get_train_dataloader())).items())
    prior, labels = inputs[SHALLOW_PRIOR_COLUMN].clone(), inputs["labels"]
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(**{k: v for k, v in inputs.items() if k not in ("labels", SHALLOW_PRIOR_COLUMN)}).logits
    return trainer, inputs, loss, logits, prior, labels


def test_reweighting_trains_the_model_alone_on_each_rows_cross_entropy_times_its_shallow_weight(tmp_path):
    trainer, inputs, loss, logits, prior, labels = _first_batch_loss(tmp_path, "reweight")
    sharpened = torch.softmax(4.0 * prior, dim=-1)[torch.arange(len(labels)), labels]
    weights = ((1 - sharpened) / 0.5).clamp(max=1.0)  # 1 - p(label) relative to its value at chance, 1 - 1/2
    per_row = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(loss, (weights * per_row).mean(), atol=1e-6)
    assert not torch.allclose(loss, product_of_experts_loss(logits, labels, prior, 4.0), atol=1e-4)
    token_level = {**inputs, "labels": labels[:, None].expand(-1, 3)}  # causal-LM labels have no class per row
    with pytest.raises(ValueError, match="`row_filter_shallow_expert_loss` must be 'product' for token-level"):
        trainer.compute_loss(trainer.model, token_level)


def test_a_product_gce_run_trains_on_the_generalised_cross_entropy_of_the_product_of_experts(tmp_path):
    _, _, loss, logits, prior, labels = _first_batch_loss(tmp_path, "product-gce")
    p_label = torch.softmax(torch.log_softmax(logits, -1) + 4.0 * prior, -1)[torch.arange(len(labels)), labels]
    assert torch.allclose(loss, ((1 - p_label**0.7) / 0.7).mean(), atol=1e-6)


def test_reweighting_never_weighs_a_row_above_plain_training_and_drops_what_the_expert_explains():
    prior = torch.log(torch.tensor([[0.001, 0.999], [0.5, 0.5], [0.95, 0.05], [0.4, 0.6]]))
    labels = torch.tensor([1, 0, 1, 1])
    weights = shallow_row_weights(prior, labels, 6.0)
    assert weights[0] < 1e-6  # explained confidently: no gradient
    assert weights[1] == pytest.approx(1.0)  # an expert at chance: plain training
    assert weights[2] == pytest.approx(1.0)  # the expert contradicts the label: plain training, not amplified
    assert 0.0 < weights[3] < 0.5  # leaning the label's way, sharpened by the weight: down-weighted
    logits = torch.randn(4, 2)
    expected = (weights * torch.nn.functional.cross_entropy(logits, labels, reduction="none")).mean()
    assert torch.allclose(reweighted_loss(logits, labels, prior, 6.0), expected)
    three = torch.log(torch.tensor([[1 / 3, 1 / 3, 1 / 3]]))  # chance for three classes is weight 1 too
    assert shallow_row_weights(three, torch.tensor([2]), 6.0).item() == pytest.approx(1.0)


def test_the_product_of_experts_loss_is_the_cross_entropy_of_the_summed_log_probabilities():
    logits, labels = torch.randn(3, 2), torch.tensor([0, 1, 1])
    prior = torch.log_softmax(torch.randn(3, 2), dim=-1)
    expected = torch.nn.functional.cross_entropy(torch.log_softmax(logits, -1) + 6.0 * prior, labels)
    assert torch.allclose(product_of_experts_loss(logits, labels, prior, 6.0), expected)


def test_under_the_generalised_cross_entropy_a_row_pulls_as_under_the_cross_entropy_times_p_label_to_the_q():
    logits = torch.randn(4, 2, requires_grad=True)
    labels, prior = torch.tensor([0, 1, 1, 0]), torch.log_softmax(torch.randn(4, 2), dim=-1)
    combined = torch.log_softmax(logits, -1) + 4.0 * prior
    (ce_grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(combined, labels, reduction="sum"), logits)
    (gce_grad,) = torch.autograd.grad(4 * product_of_experts_gce_loss(logits, labels, prior, 4.0), logits)
    p_label = torch.softmax(combined, -1)[torch.arange(4), labels].detach()
    assert torch.allclose(gce_grad, ce_grad * p_label[:, None] ** 0.7, atol=1e-6)


def test_the_generalised_cross_entropy_reads_soft_targets_and_is_one_minus_p_label_at_q_one():
    log_probs = torch.log(torch.tensor([[0.2, 0.8]]))
    assert generalised_cross_entropy(log_probs, torch.tensor([[0.0, 1.0]]), q=1.0).item() == pytest.approx(0.2)
    soft = generalised_cross_entropy(log_probs, torch.tensor([[0.5, 0.5]]), q=1.0).item()
    assert soft == pytest.approx(0.5 * 0.8 + 0.5 * 0.2)
    hard = product_of_experts_gce_loss(torch.zeros(1, 2), torch.tensor([1]), log_probs, 1.0)
    assert hard.item() == pytest.approx((1 - 0.8**0.7) / 0.7)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"row_filter_shallow_expert": True, "row_filter_shallow_expert_loss": "focal"}, "must be one of.*'focal'"),
        ({"row_filter_shallow_expert_loss": "reweight"}, "chooses how the shallow expert.*got 'reweight'"),
    ],
)
def test_the_shallow_experts_loss_is_refused_when_unknown_or_without_the_shallow_expert(fields, message):
    with pytest.raises(ValueError, match=f"`row_filter_shallow_expert_loss` {message}"):
        RowFilterArguments(row_filter=True, row_filter_shallow_probe="ngram", **fields)


def test_a_balanced_expert_is_divided_by_its_mean_prediction_over_the_training_rows_before_it_is_weighted(tmp_path):
    trainer = _trained_shallow_expert(
        tmp_path, row_filter_shallow_expert_balanced=True, row_filter_shallow_expert_weight=4.0
    )
    report = json.loads((tmp_path / "out" / ROW_FILTER_FILE).read_text())
    summary = report["summary"]
    raw = torch.tensor([row["shallow_log_probs"] for row in report["rows"]], dtype=torch.float64)
    prior = raw.exp().mean(dim=0)
    assert summary["shallow_expert_balanced"] is True
    assert summary["shallow_class_prior"] == pytest.approx(prior.tolist())
    balanced = torch.log_softmax(raw - prior.log(), dim=-1)  # the expert at chance where it has no evidence
    column = torch.tensor(trainer.train_dataset[SHALLOW_PRIOR_COLUMN], dtype=torch.float64)
    assert torch.allclose(column, balanced[report["kept"]], atol=1e-12)
    labels = torch.tensor(token_dataset(48, seed=1)["labels"])
    label_log_probs = balanced[torch.arange(48), labels]
    scales = [row["expert_gradient_scale"] for row in report["rows"]]  # reported for the expert it trains with
    assert scales == pytest.approx(expert_gradient_scale(balanced, label_log_probs, 4.0).tolist())


def test_balancing_the_expert_needs_the_shallow_expert():
    with pytest.raises(ValueError, match="`row_filter_shallow_expert_balanced` divides.*got True"):
        RowFilterArguments(row_filter=True, row_filter_shallow_probe="ngram", row_filter_shallow_expert_balanced=True)


def test_the_product_of_experts_needs_the_shallow_probe():
    with pytest.raises(ValueError, match="`row_filter_shallow_expert=True` trains with the shallow probe"):
        RowFilterArguments(row_filter=True, row_filter_shallow_expert=True)


@pytest.mark.parametrize(
    ("weight", "error", "message"),
    [
        (0.0, ValueError, "must be > 0, got 0.0"),
        (-1.0, ValueError, "must be > 0, got -1.0"),
        (float("nan"), TypeError, "must be a finite number > 0, got nan"),
        ("4", TypeError, "must be a finite number > 0, got '4'"),
    ],
)
def test_the_shallow_experts_weight_must_be_a_positive_finite_number(weight, error, message):
    with pytest.raises(error, match=f"`row_filter_shallow_expert_weight` {message}"):
        RowFilterArguments(
            row_filter=True,
            row_filter_shallow_probe="ngram",
            row_filter_shallow_expert=True,
            row_filter_shallow_expert_weight=weight,
        )


def test_the_shallow_experts_weight_is_refused_without_the_product_of_experts():
    with pytest.raises(ValueError, match="`row_filter_shallow_expert_weight` weighs the shallow expert.*got 4.0"):
        RowFilterArguments(row_filter=True, row_filter_shallow_probe="ngram", row_filter_shallow_expert_weight=4.0)


def test_the_expert_gradient_scale_is_one_minus_the_sharpened_experts_probability_of_the_label():
    log_probs = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1]], dtype=torch.float64))
    labels = torch.tensor([1, 2])
    label_log_probs = log_probs[torch.arange(2), labels]
    for weight in (1.0, 2.0, 4.0):
        sharpened = torch.softmax(weight * log_probs, dim=-1)
        expected = 1 - sharpened[torch.arange(2), labels]
        assert torch.allclose(expert_gradient_scale(log_probs, label_log_probs, weight), expected)
    # Sharpening takes gradient from the row the expert explains (row 0) and gives it to the row it gets wrong.
    mild, sharp = (expert_gradient_scale(log_probs, label_log_probs, w) for w in (1.0, 4.0))
    assert sharp[0] < mild[0] and sharp[1] > mild[1]
