"""Specification of gradient alignment: the pure `align_gradients`, its arguments and the trainers built on it."""

from __future__ import annotations

import copy
import math
import random
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments, default_data_collator

import peft_musclelora
from peft_musclelora import (
    GradientAlignmentArguments,
    GradientAlignmentMixin,
    MuScleLoraConfig,
    MuScleLoraTrainer,
    MuScleLoraTrainingArguments,
    align_gradients,
)
from peft_musclelora.gradient_alignment import select_branch
from peft_musclelora.trainer import reference_split_indices, stratified_quotas
from tests.distributed_launch import ROOT, run_two_processes
from tests.ga_helpers import tiny_bert, tiny_llama, tiny_tokenizer, token_dataset, trainable_state

# ---------------------------------------------------------------------------------------------------------------------
# align_gradients on hand-computed tensors
# ---------------------------------------------------------------------------------------------------------------------


def test_orthogonal_reference_gradient_zeroes_the_update():
    new, stats = align_gradients([torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 2.0])])
    assert torch.equal(new[0], torch.tensor([0.0, 0.0]))
    assert stats.branch == "aligned" and stats.cosine == 0.0


def test_parallel_gradient_is_kept():
    new, stats = align_gradients([torch.tensor([2.0, 4.0])], [torch.tensor([1.0, 2.0])])
    assert torch.allclose(new[0], torch.tensor([2.0, 4.0]))
    assert stats.cosine == pytest.approx(1.0)


def test_anti_parallel_gradient_is_flipped_onto_the_reference_direction():
    # |<g, g_c>| / ||g_c||^2 * g_c with g = -2 g_c gives +2 g_c: the update always descends the clean loss.
    new, stats = align_gradients([torch.tensor([-2.0, -4.0])], [torch.tensor([1.0, 2.0])])
    assert torch.allclose(new[0], torch.tensor([2.0, 4.0]))
    assert stats.cosine == pytest.approx(-1.0)


def test_each_tensor_is_projected_on_its_own_reference_gradient():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 1.0], [0.0, 2.0]])]
    refs = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 0.0], [0.0, -1.0]])]
    new, stats = align_gradients(grads, refs)
    assert torch.equal(new[0], torch.tensor([3.0, 0.0]))  # <g,c>=3, ||c||^2=1
    assert torch.equal(new[1], torch.tensor([[0.0, 0.0], [0.0, -2.0]]))  # |<g,c>|=2, ||c||^2=1, times c
    assert stats.ref_grad_norm == pytest.approx(1.0)  # mean of ||c|| = (1 + 1) / 2
    assert stats.cosine == pytest.approx((3.0 - 2.0) / (math.sqrt(31.0) * math.sqrt(2.0)))
    assert torch.equal(grads[0], torch.tensor([3.0, 4.0])), "not in place by default"


def test_zero_reference_gradient_falls_back_to_the_raw_gradient_and_is_excluded_from_the_gate():
    grads = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    refs = [torch.zeros(2), torch.tensor([4.0])]
    new, stats = align_gradients(grads, refs)
    assert torch.equal(new[0], torch.tensor([1.0, 2.0]))
    assert torch.equal(new[1], torch.tensor([3.0]))
    assert stats.fallback_tensors == 1 and stats.ref_grad_norm == pytest.approx(4.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_reference_gradient_falls_back_without_producing_nan(bad):
    grads = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])]
    refs = [torch.tensor([bad, 1.0]), torch.tensor([1.0, 0.0])]
    new, stats = align_gradients(grads, refs)
    assert torch.equal(new[0], torch.tensor([1.0, 2.0]))
    assert torch.equal(new[1], torch.tensor([3.0, 0.0]))
    assert stats.fallback_tensors == 1
    assert all(torch.isfinite(t).all() for t in new) and math.isfinite(stats.cosine)


def test_missing_gradients_stay_missing_and_missing_reference_gradients_fall_back():
    grads = [None, torch.tensor([1.0]), torch.tensor([2.0, 0.0])]
    new, stats = align_gradients(grads, [torch.tensor([1.0]), None, torch.tensor([1.0, 1.0])])
    assert new[0] is None and torch.equal(new[1], torch.tensor([1.0])) and torch.equal(new[2], torch.ones(2))
    assert stats.num_tensors == 2 and stats.fallback_tensors == 1 and stats.branch == "aligned"


def test_inplace_writes_into_the_given_gradients():
    g = torch.tensor([3.0, 4.0])
    new, _ = align_gradients([g], [torch.tensor([0.0, 1.0])], inplace=True)
    assert new[0] is g and torch.equal(g, torch.tensor([0.0, 4.0]))


def test_subspace_alignment_projects_onto_the_span_of_current_and_earlier_reference_gradients():
    g, c, earlier = torch.tensor([3.0, 4.0, 5.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    new, stats = align_gradients([g], [c], ref_history=[[earlier]])
    torch.testing.assert_close(new[0], torch.tensor([3.0, 4.0, 0.0]))  # the part of g in span(c, earlier)
    assert stats.branch == "aligned"


def test_subspace_alignment_reflects_the_current_reference_component_like_the_absolute_value():
    g, c, earlier = torch.tensor([-3.0, 4.0, 5.0]), torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    new, _ = align_gradients([g], [c], ref_history=[[earlier]])
    torch.testing.assert_close(new[0], torch.tensor([3.0, 4.0, 0.0]))
    assert float(new[0] @ c) > 0, "the update still descends the current reference loss"


def test_subspace_alignment_ignores_zero_parallel_and_missing_earlier_gradients():
    g, c = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])
    plain, _ = align_gradients([g], [c])
    for earlier in (torch.zeros(2), 2 * c, torch.tensor([float("nan"), 1.0]), None):
        new, stats = align_gradients([g], [c], ref_history=[[earlier]])
        torch.testing.assert_close(new[0], plain[0])
        assert stats.fallback_tensors == 0


def test_subspace_alignment_in_the_mixed_branch():
    g, c, earlier = torch.tensor([3.0, 4.0, 5.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    new, stats = align_gradients(
        [g], [c], ref_history=[[earlier]], ref_loss=0.1, min_ref_loss=0.4, max_raw_grad_ratio=0.5, num_epochs=1.0,
        epoch=1.0,
    )  # fmt: skip
    assert stats.branch == "mixed" and stats.mu == 0.5
    torch.testing.assert_close(new[0], 0.5 * torch.tensor([3.0, 4.0, 0.0]) + 0.5 * g)


def test_bfloat16_gradients_are_aligned_in_their_dtype():
    new, _ = align_gradients([torch.tensor([3.0, 4.0], dtype=torch.bfloat16)], [torch.tensor([1.0, 0.0])])
    assert new[0].dtype == torch.bfloat16 and torch.equal(new[0].float(), torch.tensor([3.0, 0.0]))


def test_mismatched_lengths_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        align_gradients([torch.ones(2)], [])
    with pytest.raises(ValueError, match="shape"):
        align_gradients([torch.ones(2)], [torch.ones(3)])


# ---------------------------------------------------------------------------------------------------------------------
# Branch selection, in the reference implementation's order
# ---------------------------------------------------------------------------------------------------------------------

PUBLISHED_BERT = {"ga_warmup_epochs": 1.0, "max_raw_grad_ratio": 0.1, "min_ref_loss": 0.4}


def test_aligned_branch_is_used_whenever_the_gate_holds_even_during_warm_up():
    assert select_branch(ref_grad_norm=1e-3, ref_loss=0.7, epoch=0.2, num_epochs=10, **PUBLISHED_BERT) == (
        "aligned",
        0.0,
    )


def test_low_reference_loss_after_warm_up_mixes_with_the_linear_mu_schedule():
    branch, mu = select_branch(ref_grad_norm=1e-3, ref_loss=0.3, epoch=4.0, num_epochs=10, **PUBLISHED_BERT)
    assert branch == "mixed" and mu == pytest.approx(0.1 * (4.0 - 1.0) / (10 - 1.0))


def test_tiny_reference_gradient_norm_also_closes_the_gate():
    branch, _ = select_branch(ref_grad_norm=1e-8, ref_loss=5.0, epoch=2.0, num_epochs=10, **PUBLISHED_BERT)
    assert branch == "mixed"


def test_gate_closed_during_warm_up_uses_the_raw_gradient():
    assert select_branch(ref_grad_norm=1e-3, ref_loss=0.3, epoch=0.5, num_epochs=10, **PUBLISHED_BERT) == ("raw", 1.0)


def test_gate_closed_without_mixing_uses_the_raw_gradient():
    assert select_branch(ref_grad_norm=1e-3, ref_loss=0.3, epoch=5.0, num_epochs=10, min_ref_loss=0.4)[0] == "raw"


def test_mixed_branch_combines_aligned_and_raw_gradients():
    g, c = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])
    new, stats = align_gradients(
        [g], [c], ref_loss=0.1, epoch=5.5, num_epochs=10.0, ga_warmup_epochs=1.0, max_raw_grad_ratio=0.1,
        min_ref_loss=0.4,
    )  # fmt: skip
    mu = 0.1 * 4.5 / 9.0
    assert stats.branch == "mixed" and stats.mu == pytest.approx(mu)
    assert torch.allclose(new[0], (1 - mu) * torch.tensor([3.0, 0.0]) + mu * g)


def test_raw_branch_returns_the_gradient_unchanged():
    g = torch.tensor([3.0, 4.0])
    new, stats = align_gradients([g], [torch.tensor([1.0, 0.0])], ref_loss=0.1, min_ref_loss=0.4)
    assert stats.branch == "raw" and torch.equal(new[0], g)


def test_zero_fallback_gives_a_zero_gradient_when_the_references_are_fitted():
    g = torch.tensor([3.0, 4.0])
    new, stats = align_gradients([g], [torch.tensor([1e-9, 0.0])], fallback="zero")
    assert stats.branch == "zero" and stats.mu == 0.0
    assert torch.equal(new[0], torch.zeros(2)) and torch.equal(g, torch.tensor([3.0, 4.0])), "not in place"


def test_zero_fallback_zeroes_tensors_without_a_reference_signal_and_aligns_the_others():
    grads = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0]), None]
    refs = [torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([1.0])]
    new, stats = align_gradients(grads, refs, fallback="zero", inplace=True)
    assert stats.branch == "aligned" and stats.fallback_tensors == 1
    assert torch.equal(new[0], torch.zeros(2)) and torch.equal(new[1], torch.tensor([3.0, 0.0])) and new[2] is None
    assert new[0] is grads[0]


def test_zero_fallback_leaves_the_aligned_and_mixed_branches_as_they_are():
    g, c = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])
    gates = {"ref_loss": 0.1, "epoch": 5.5, "num_epochs": 10.0, "ga_warmup_epochs": 1.0, "max_raw_grad_ratio": 0.1,
             "min_ref_loss": 0.4}  # fmt: skip
    for kwargs in ({}, gates):
        raw_rule, _ = align_gradients([g], [c], **kwargs)
        zero_rule, _ = align_gradients([g], [c], fallback="zero", **kwargs)
        assert torch.equal(raw_rule[0], zero_rule[0])


def test_unknown_fallback_is_rejected():
    with pytest.raises(ValueError, match=r"`fallback` must be one of 'raw', 'zero', got 'skip'"):
        align_gradients([torch.ones(1)], [torch.ones(1)], fallback="skip")


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


def test_published_bert_preset_is_expressible(tmp_path):
    args = MuScleLoraTrainingArguments(
        output_dir=str(tmp_path), reference_split_size=96, num_train_epochs=10, report_to=[], **PUBLISHED_BERT
    )
    assert (args.reference_split_size, args.min_ref_grad_norm, args.ga_every_n_steps) == (96, 5e-7, 1)


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("max_raw_grad_ratio", -0.1, ValueError, r"max_raw_grad_ratio.*\[0, 1\].*-0\.1"),
        ("max_raw_grad_ratio", 1.5, ValueError, r"max_raw_grad_ratio.*1\.5"),
        ("ga_warmup_epochs", -1.0, ValueError, r"ga_warmup_epochs.*>= 0"),
        ("ga_warmup_epochs", 4.0, ValueError, r"ga_warmup_epochs.*num_train_epochs.*3"),
        ("ga_every_n_steps", 0, ValueError, r"ga_every_n_steps.*>= 1.*0"),
        ("ga_every_n_steps", 1.5, TypeError, r"ga_every_n_steps"),
        ("reference_split_size", 0, ValueError, r"reference_split_size.*0"),
        ("reference_batch_size", -2, ValueError, r"reference_batch_size.*-2"),
        ("min_ref_loss", -0.4, ValueError, r"min_ref_loss"),
        ("min_ref_grad_norm", float("nan"), TypeError, r"min_ref_grad_norm"),
        ("reference_seed", "7", TypeError, r"reference_seed"),
        ("ga_params", "lora_(", ValueError, r"ga_params.*regex"),
        ("gradient_alignment", "yes", TypeError, r"gradient_alignment"),
        ("reference_dropout", "no", TypeError, r"reference_dropout.*'no'"),
        ("ga_subspace_size", 0, ValueError, r"ga_subspace_size.*>= 1.*0"),
        ("ga_fallback", "skip", ValueError, r"ga_fallback.*'raw', 'zero'.*'skip'"),
        ("ga_subspace_size", True, TypeError, r"ga_subspace_size"),
    ],
)
def test_invalid_arguments_are_rejected_naming_field_and_value(tmp_path, field, value, error, message):
    with pytest.raises(error, match=message):
        MuScleLoraTrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, report_to=[], **{field: value})


def test_warm_up_beyond_epochs_is_allowed_when_training_is_bounded_by_max_steps(tmp_path):
    args = MuScleLoraTrainingArguments(output_dir=str(tmp_path), max_steps=5, ga_warmup_epochs=4.0, report_to=[])
    assert args.ga_warmup_epochs == 4.0


# ---------------------------------------------------------------------------------------------------------------------
# Trainer construction and its errors
# ---------------------------------------------------------------------------------------------------------------------


def make_args(tmp_path, **overrides) -> MuScleLoraTrainingArguments:
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "per_device_train_batch_size": 4,
        "num_train_epochs": 1,
        "learning_rate": 0.05,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        "disable_tqdm": True,
    }
    return MuScleLoraTrainingArguments(**{**defaults, **overrides})


def make_trainer(tmp_path, model=None, args=None, train_rows=16, eval_rows=None, reference_rows=8, **kwargs):
    if reference_rows:
        kwargs["reference_dataset"] = token_dataset(reference_rows, seed=2)
    return MuScleLoraTrainer(
        model=model if model is not None else tiny_bert(),
        args=args if args is not None else make_args(tmp_path),
        train_dataset=token_dataset(train_rows, seed=1),
        eval_dataset=token_dataset(eval_rows, seed=3) if eval_rows else None,
        data_collator=default_data_collator,
        **kwargs,
    )


def test_reference_split_takes_seeded_rows_out_of_the_eval_set(tmp_path):
    args = make_args(tmp_path, reference_split_size=5)
    first = make_trainer(tmp_path, args=args, eval_rows=12, reference_rows=None)
    second = make_trainer(tmp_path, args=args, eval_rows=12, reference_rows=None)
    eval_ids = {tuple(row) for row in token_dataset(12, seed=3)["input_ids"]}
    reference = {tuple(row) for row in first.reference_dataset["input_ids"]}
    rest = {tuple(row) for row in first.eval_dataset["input_ids"]}
    assert len(first.reference_dataset) == 5 and len(first.eval_dataset) == 7
    assert reference | rest == eval_ids and not reference & rest
    assert first.reference_dataset["input_ids"] == second.reference_dataset["input_ids"]


def test_stratified_reference_split_gives_each_label_its_share_and_stays_seeded(tmp_path):
    labels = [0] * 9 + [1] * 3  # 12 eval rows, a quarter of label 1
    eval_set = token_dataset(12, seed=3).remove_columns("labels").add_column("labels", labels)
    args = make_args(tmp_path, reference_split_size=4, reference_stratify=True)
    trainers = [
        MuScleLoraTrainer(
            model=tiny_bert(),
            args=args,
            train_dataset=token_dataset(16, seed=1),
            eval_dataset=eval_set,
            data_collator=default_data_collator,
        )
        for _ in range(2)
    ]
    assert sorted(trainers[0].reference_dataset["labels"]) == [0, 0, 0, 1]
    assert sorted(trainers[0].eval_dataset["labels"]) == [0] * 6 + [1] * 2
    assert trainers[0].reference_dataset["input_ids"] == trainers[1].reference_dataset["input_ids"]
    expected = reference_split_indices(12, 4, seed=0, labels=labels)[0]
    assert trainers[0].reference_dataset["input_ids"] == [eval_set[i]["input_ids"] for i in expected]


@pytest.mark.parametrize("seed", range(5))
def test_stratified_quotas_sum_to_the_size_and_follow_the_label_shares(seed):
    rng = random.Random(seed)
    counts = {label: rng.randint(1, 60) for label in range(rng.randint(2, 6))}
    size = rng.randint(len(counts), sum(counts.values()))
    quotas = stratified_quotas(counts, size)
    total = sum(counts.values())
    assert sum(quotas.values()) == size
    shares = {label: size * count / total for label, count in counts.items()}
    for label, count in counts.items():
        assert 1 <= quotas[label] <= count  # every label kept (size >= labels), never more rows than it has
        if min(shares.values()) >= 1:  # no label needed the at-least-one rule: largest remainder rounding
            assert abs(quotas[label] - shares[label]) < 1


def test_missing_reference_source_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="reference_dataset=.*reference_split_size"):
        make_trainer(tmp_path, reference_rows=None)


def test_both_reference_sources_at_once_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="either"):
        make_trainer(tmp_path, args=make_args(tmp_path, reference_split_size=4), eval_rows=12)


def test_empty_reference_set_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        make_trainer(tmp_path, reference_dataset=token_dataset(4, seed=2).select([]), reference_rows=None)


def test_reference_columns_must_match_the_training_columns(tmp_path):
    reference = token_dataset(8, seed=2).remove_columns("attention_mask")
    with pytest.raises(ValueError, match=r"columns \['input_ids', 'labels'\] differ"):
        make_trainer(tmp_path, reference_dataset=reference, reference_rows=None)


def test_reference_split_needs_an_eval_set_large_enough(tmp_path):
    with pytest.raises(ValueError, match="eval_dataset.*None"):
        make_trainer(tmp_path, args=make_args(tmp_path, reference_split_size=4), reference_rows=None)
    args = make_args(tmp_path, reference_split_size=20, eval_strategy="steps", eval_steps=1)
    with pytest.raises(ValueError, match=r"reference_split_size.*20.*12 rows"):
        make_trainer(tmp_path, args=args, eval_rows=12, reference_rows=None)


def test_ga_params_that_match_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="ga_params='lora_'"):
        make_trainer(tmp_path, args=make_args(tmp_path, ga_params="lora_"))


def test_gradient_alignment_args_cannot_be_given_twice(tmp_path):
    with pytest.raises(ValueError, match="gradient_alignment_args"):
        make_trainer(tmp_path, gradient_alignment_args=GradientAlignmentArguments())


# ---------------------------------------------------------------------------------------------------------------------
# Training behaviour
# ---------------------------------------------------------------------------------------------------------------------


def test_with_ga_the_update_is_the_reference_gradient_scaled_by_the_projection(tmp_path):
    train, reference = token_dataset(8, seed=1), token_dataset(6, seed=2)
    model = tiny_bert()
    start = copy.deepcopy(model)

    def mean_gradient(rows):
        probe = copy.deepcopy(start).train()
        batch = {k: torch.tensor(v) for k, v in rows.to_dict().items()}
        names = [name for name, _ in probe.named_parameters()]
        grads = torch.autograd.grad(probe(**batch).loss, list(probe.parameters()), allow_unused=True)
        return dict(zip(names, grads))

    g, g_c = mean_gradient(train), mean_gradient(reference)
    args = make_args(
        tmp_path, optim="sgd", learning_rate=0.5, max_steps=1, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, per_device_train_batch_size=8, reference_batch_size=6,
    )  # fmt: skip
    trainer = MuScleLoraTrainer(
        model=model, args=args, train_dataset=train, reference_dataset=reference, data_collator=default_data_collator
    )
    trainer.train()
    checked = 0
    for name, param in trainer.model.named_parameters():
        if g_c[name] is None or g_c[name].norm() == 0:
            continue
        delta = param.detach() - dict(start.named_parameters())[name].detach()
        coefficient = (g[name] * g_c[name]).sum().abs() / g_c[name].pow(2).sum()
        torch.testing.assert_close(delta, -0.5 * coefficient * g_c[name], atol=1e-6, rtol=1e-4)
        checked += 1
    assert checked > 10
    assert trainer.state.log_history[0]["ga/branch_aligned"] == 1.0


def test_gradient_alignment_off_trains_exactly_like_a_plain_trainer(tmp_path):
    model = tiny_bert(dropout=0.1)
    plain_model = copy.deepcopy(model)
    args = make_args(tmp_path, gradient_alignment=False)
    make_trainer(tmp_path, model=model, args=args, reference_rows=None).train()
    plain_args = TrainingArguments(**{k: getattr(args, k) for k in ("output_dir", "use_cpu", "num_train_epochs",
                                   "per_device_train_batch_size", "learning_rate", "report_to", "save_strategy",
                                   "logging_steps", "seed")})  # fmt: skip
    Trainer(
        model=plain_model, args=plain_args, train_dataset=token_dataset(16, seed=1),
        data_collator=default_data_collator,
    ).train()  # fmt: skip
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), plain_model.state_dict().items()):
        assert torch.equal(mine, theirs), name


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    results = []
    for batch, steps in ((2, 2), (4, 1)):
        args = make_args(tmp_path, optim="sgd", per_device_train_batch_size=batch, gradient_accumulation_steps=steps)
        trainer = make_trainer(tmp_path, args=args)
        # BERT's forward takes **kwargs, so the Trainer assumes it normalises the loss by `num_items_in_batch`; its
        # classification loss does not, and the accumulated gradient would be twice as large. Make the Trainer scale
        # the loss itself, so the comparison is between equal training gradients.
        trainer.model_accepts_loss_kwargs = False
        trainer.train()
        results.append(trainable_state(trainer.model))
        assert trainer.state.global_step == 4
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_training_on_cpu_stays_finite_and_logs_ga_metrics(tmp_path):
    trainer = make_trainer(tmp_path, args=make_args(tmp_path, bf16=True, num_train_epochs=2))
    trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    expected = {"ga/ref_loss", "ga/ref_grad_norm", "ga/cosine", "ga/branch_aligned", "ga/branch_mixed",
                "ga/branch_raw", "ga/branch_zero", "ga/fallback_tensors"}  # fmt: skip
    assert logs and all(expected <= entry.keys() for entry in logs)
    assert all(math.isfinite(entry["ga/ref_loss"]) and math.isfinite(entry["ga/cosine"]) for entry in logs)


def test_zero_fallback_never_applies_the_untrusted_gradient_once_the_gate_closes(tmp_path):
    # min_ref_loss above any loss keeps the aligned branch shut on every step: the raw rule would train on the
    # (possibly poisoned) batches, the fail-closed rule must leave the weights where they started.
    model = tiny_bert()
    start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    args = make_args(tmp_path, min_ref_loss=1e9, ga_fallback="zero", num_train_epochs=2)
    trainer = make_trainer(tmp_path, model=model, args=args)
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if name in start:
            torch.testing.assert_close(param.detach(), start[name], atol=0, rtol=0, msg=name)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(entry["ga/branch_zero"] == 1.0 and entry["ga/branch_raw"] == 0.0 for entry in logs)


@pytest.mark.parametrize("subspace", [1, 3], ids=["published-projection", "subspace"])
def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path, subspace):
    def run(resume):
        args = make_args(
            tmp_path, num_train_epochs=2, save_strategy="steps", save_steps=3, ga_every_n_steps=2,
            ga_subspace_size=subspace,
        )  # fmt: skip
        trainer = make_trainer(tmp_path, model=tiny_bert(dropout=0.1), args=args)
        trainer.train(resume_from_checkpoint=resume)
        return trainable_state(trainer.model)

    uninterrupted = run(None)
    checkpoint = tmp_path / "out" / "checkpoint-3"
    # The resumable state is JSON plus safetensors: nothing that loading would unpickle.
    assert (checkpoint / "gradient_alignment" / "state.json").is_file()
    assert (checkpoint / "gradient_alignment" / "ref_grads.safetensors").is_file()
    assert not list((checkpoint / "gradient_alignment").glob("*.pt"))
    resumed = run(str(checkpoint))
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name


def test_subspace_keeps_the_last_n_minus_one_reference_gradients(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, args=make_args(tmp_path, ga_subspace_size=3, num_train_epochs=2))
    history_lengths = []
    original = peft_musclelora.trainer.align_gradients

    def align(grads, ref_grads, **kwargs):
        history = kwargs["ref_history"] or []
        history_lengths.append(len(history))
        assert all(earlier is not ref_grads for earlier in history)
        return original(grads, ref_grads, **kwargs)

    monkeypatch.setattr(peft_musclelora.trainer, "align_gradients", align)
    trainer.train()
    assert history_lengths == [0, 1, 2, 2, 2, 2, 2, 2]


def test_reference_gradient_is_reused_between_refreshes(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, args=make_args(tmp_path, ga_every_n_steps=3, num_train_epochs=2))
    calls = []
    original = trainer._reference_gradients
    monkeypatch.setattr(trainer, "_reference_gradients", lambda *a: calls.append(1) or original(*a))
    trainer.train()
    assert trainer.state.global_step == 8 and len(calls) == 3  # steps 0, 3, 6


def _capture_reference_pass(trainer, monkeypatch) -> dict:
    """Record the reference gradients handed to `align_gradients` and the module modes seen by the reference loss."""
    seen: dict = {}
    original_loss, original_align = trainer.compute_reference_loss, peft_musclelora.trainer.align_gradients

    def reference_loss(model, inputs):
        seen.setdefault("modes", {name: module.training for name, module in model.named_modules()})
        return original_loss(model, inputs)

    def align(grads, ref_grads, **kwargs):
        seen.setdefault("ref_grads", [g.detach().clone() for g in ref_grads])
        return original_align(grads, ref_grads, **kwargs)

    monkeypatch.setattr(trainer, "compute_reference_loss", reference_loss)
    monkeypatch.setattr(peft_musclelora.trainer, "align_gradients", align)
    return seen


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_reference_gradient_is_taken_without_dropout_by_default(tmp_path, monkeypatch, checkpointing):
    model = tiny_bert(dropout=0.5)
    start = copy.deepcopy(model).eval()
    args = make_args(
        tmp_path, max_steps=1, per_device_train_batch_size=8, reference_batch_size=8,
        activation_checkpointing=checkpointing,
    )  # fmt: skip
    trainer = make_trainer(tmp_path, model=model, args=args, reference_rows=8)
    seen = _capture_reference_pass(trainer, monkeypatch)
    trainer.train()

    batch = {k: torch.tensor(v) for k, v in token_dataset(8, seed=2).to_dict().items()}
    params = [p for p in start.parameters() if p.requires_grad]
    expected = torch.autograd.grad(start(**batch).loss, params, allow_unused=True)
    for got, want in zip(seen["ref_grads"], expected):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, atol=1e-6, rtol=1e-4)
    modules = dict(trainer.model.named_modules())
    dropout_modes = [seen["modes"][name] for name, m in modules.items() if isinstance(m, torch.nn.Dropout)]
    assert dropout_modes and not any(dropout_modes)
    checkpointed = [name for name, m in modules.items() if getattr(m, "gradient_checkpointing", None) is True]
    assert bool(checkpointed) == checkpointing, "the tiny BERT must expose the checkpointing flag"
    assert all(seen["modes"][name] for name in checkpointed), "checkpointing stays on in the reference pass"
    assert all(module.training for module in trainer.model.modules()), "train mode is restored afterwards"


def test_reference_dropout_keeps_the_reference_pass_in_train_mode(tmp_path, monkeypatch):
    args = make_args(tmp_path, max_steps=1, reference_dropout=True)
    trainer = make_trainer(tmp_path, model=tiny_bert(dropout=0.5), args=args)
    seen = _capture_reference_pass(trainer, monkeypatch)
    trainer.train()
    assert all(seen["modes"].values())


def test_load_best_model_at_end_with_evaluation_during_training(tmp_path):
    args = make_args(
        tmp_path, reference_split_size=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", num_train_epochs=2,
    )  # fmt: skip
    trainer = make_trainer(tmp_path, args=args, eval_rows=14, reference_rows=None)
    trainer.train()
    assert len(trainer.eval_dataset) == 8
    assert trainer.state.best_model_checkpoint is not None
    assert sum("eval_loss" in entry for entry in trainer.state.log_history) == 4


@pytest.mark.parametrize("adapter", ["musclelora", "lora", "full"])
def test_works_with_musclelora_plain_lora_and_full_fine_tuning(tmp_path, adapter):
    model = tiny_bert()
    if adapter == "musclelora":
        config = MuScleLoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"], scales=[1.0, 2.0])
        model = get_peft_model(model, config)
    elif adapter == "lora":
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    before = trainable_state(model)
    trainer = make_trainer(tmp_path, model=model)
    trainer.train()
    after = trainable_state(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert trainer.state.log_history[0]["ga/branch_aligned"] == 1.0


def test_ga_params_restricts_alignment_to_matching_tensors(tmp_path):
    trainer = make_trainer(tmp_path, args=make_args(tmp_path, ga_params=r"^classifier\."))
    assert trainer._ga_param_names == ["classifier.weight", "classifier.bias"]
    trainer.train()
    assert trainer.state.log_history[0]["ga/branch_aligned"] == 1.0


def test_data_parallel_ranks_end_with_identical_weights(tmp_path):
    run_dir = run_two_processes(ROOT / "tests" / "ddp_ga_train.py", tmp_path, 300, tail=3000)
    rank0, rank1 = load_file(run_dir / "rank0.safetensors"), load_file(run_dir / "rank1.safetensors")
    start = tiny_bert().state_dict()
    assert any(not torch.equal(rank0[name], start[name]) for name in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    log = (run_dir / "log0.json").read_text()
    assert '"ga/branch_aligned": 1.0' in log


# ---------------------------------------------------------------------------------------------------------------------
# TRL and bitsandbytes
# ---------------------------------------------------------------------------------------------------------------------


def causal_rows(rows: int, seed: int, vocab: int = 32):
    import datasets

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, 10), generator=generator)
    ids[:, -1] = 1
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def test_defended_sft_trainer_from_the_mixin_trains_a_tiny_llama(tmp_path):
    from trl import SFTConfig, SFTTrainer

    class DefendedSFTTrainer(GradientAlignmentMixin, SFTTrainer):
        pass

    model = get_peft_model(tiny_llama(), MuScleLoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    before = trainable_state(model)
    config = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, use_cpu=True,
                       report_to=[], logging_steps=1, save_strategy="no", max_length=16, bf16=False)  # fmt: skip
    trainer = DefendedSFTTrainer(
        model=model, args=config, train_dataset=causal_rows(12, seed=1), processing_class=tiny_tokenizer(),
        reference_dataset=causal_rows(6, seed=2), gradient_alignment_args=GradientAlignmentArguments(),
    )  # fmt: skip
    trainer.train()
    after = trainable_state(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(entry["ga/branch_aligned"] == 1.0 for entry in logs)
    assert all("mean_token_accuracy" in entry for entry in logs)


def test_ready_made_sft_trainer_splits_references_from_eval(tmp_path):
    from peft_musclelora import MuScleLoraSFTConfig, MuScleLoraSFTTrainer

    config = MuScleLoraSFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                                 report_to=[], save_strategy="no", max_length=16, bf16=False, logging_steps=1,
                                 reference_split_size=4)  # fmt: skip
    trainer = MuScleLoraSFTTrainer(
        model=tiny_llama(), args=config, train_dataset=causal_rows(8, seed=1), eval_dataset=causal_rows(10, seed=3),
        processing_class=tiny_tokenizer(),
    )  # fmt: skip
    trainer.train()
    assert len(trainer.reference_dataset) == 4 and len(trainer.eval_dataset) == 6
    assert trainer.state.log_history[0]["ga/branch_aligned"] == 1.0


def test_lazy_trl_export_names_the_extra_when_trl_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "peft_musclelora.sft", raising=False)
    monkeypatch.delattr(peft_musclelora, "sft", raising=False)
    with pytest.raises(ImportError, match=r"peft-musclelora\[trl\]"):
        peft_musclelora.MuScleLoraSFTTrainer  # noqa: B018


@pytest.mark.bitsandbytes
def test_four_bit_llama_trains_with_gradient_alignment(tmp_path):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama(hidden=128).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    model = get_peft_model(base, MuScleLoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"]))
    before = trainable_state(model)
    rows = causal_rows(8, seed=1).map(lambda row: {"labels": row["input_ids"]})
    reference = causal_rows(4, seed=2).map(lambda row: {"labels": row["input_ids"]})
    args = make_args(tmp_path, max_steps=2, per_device_train_batch_size=2, learning_rate=0.01)
    trainer = MuScleLoraTrainer(model=model, args=args, train_dataset=rows, reference_dataset=reference,
                                data_collator=default_data_collator)  # fmt: skip
    trainer.train()
    after = trainable_state(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert all(torch.isfinite(value).all() for value in after.values())
    assert trainer.state.log_history[0]["ga/branch_aligned"] == 1.0
