"""Refitting the output bias on the trusted rows (`row_filter_refit_bias`): the maximum-likelihood class offset,
added to the output layer's own bias and to nothing else."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_musclelora import MuScleLoraTrainer
from peft_musclelora.bias_refit import fit_class_offset, output_bias
from peft_musclelora.row_filter import ROW_FILTER_FILE, RowFilterArguments

from .ga_helpers import row_filter_training_args, tiny_bert, token_dataset, trainable_state


def test_the_offset_makes_the_mean_predicted_probability_of_each_class_its_share_of_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (200,), generator=generator)
    offset = fit_class_offset(logits, labels)
    # The likelihood's gradient in the offset is (mean probability - label share) per class: zero at the optimum.
    mean_probability = torch.softmax(logits + offset, dim=-1).mean(dim=0)
    label_share = torch.bincount(labels, minlength=3).double() / 200
    assert offset[0] == 0.0
    assert torch.allclose(mean_probability, label_share, atol=1e-5)


def test_the_offset_undoes_a_constant_shift_of_a_calibrated_models_logits():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4000, 2, generator=generator, dtype=torch.float64) * 2
    labels = torch.bernoulli(torch.softmax(logits, -1)[:, 1], generator=generator).long()
    shift = torch.tensor([0.0, -1.5], dtype=torch.float64)  # a model leaning against class 1 by 1.5 nats
    offset = fit_class_offset(logits + shift, labels)
    assert offset[1].item() == pytest.approx(1.5, abs=0.15)  # sampling noise of 4000 labels


def test_the_output_bias_is_the_last_trainable_bias_of_the_class_count_peft_modules_to_save_included():
    assert output_bias(tiny_bert(seed=0), 2)[0] == "classifier.bias"
    config = LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    name, param = output_bias(get_peft_model(tiny_bert(seed=0), config), 2)
    assert name.endswith("classifier.modules_to_save.default.bias") and param.requires_grad


def test_a_model_without_a_trainable_output_bias_is_refused_in_one_line():
    config = LoraConfig(r=2, target_modules=["query", "value"])  # classifier frozen
    with pytest.raises(ValueError, match=r"found no trainable parameter `\*.bias` of shape \(2,\)"):
        output_bias(get_peft_model(tiny_bert(seed=0), config), 2)


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"row_filter": True, "row_filter_refit_bias": "yes"}, TypeError, r"`row_filter_refit_bias`.*'yes'"),
        ({"row_filter_refit_bias": True}, ValueError, r"`row_filter_refit_bias=True`.*set row_filter=True"),
    ],
)
def test_invalid_refit_settings_name_the_field_and_the_value(fields, error, message):
    with pytest.raises(error, match=message):
        RowFilterArguments(**fields)


def _trained(tmp_path, refit: bool) -> MuScleLoraTrainer:
    trainer = MuScleLoraTrainer(
        model=tiny_bert(seed=0),
        args=row_filter_training_args(tmp_path / str(refit), row_filter_refit_bias=refit),
        train_dataset=token_dataset(48, seed=1),
        reference_dataset=token_dataset(40, seed=2),
    )
    trainer.train()
    return trainer


def test_the_refit_moves_the_output_bias_by_the_reported_offset_and_nothing_else(tmp_path):
    plain, refitted = _trained(tmp_path, refit=False), _trained(tmp_path, refit=True)
    report = json.loads((tmp_path / "True" / "out" / ROW_FILTER_FILE).read_text())["bias_refit"]
    assert report["parameter"] == "classifier.bias" and report["trusted_rows"] == 40
    before, after = trainable_state(plain.model), trainable_state(refitted.model)
    for name in before:
        if name != "classifier.bias":
            assert torch.equal(before[name], after[name]), name
    moved = after["classifier.bias"] - before["classifier.bias"]
    assert torch.allclose(moved.double(), torch.tensor(report["offset"], dtype=torch.float64), atol=1e-6)
    assert report["trusted_accuracy_after"] >= 0 and report["seconds"] >= 0
