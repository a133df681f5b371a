"""Running averages of the trainable weights: what they average, and that swapping one in never loses the trained
weights."""

import json
from collections.abc import Callable

import pytest
import torch
from transformers import TrainerCallback

from peft_musclelora import MuScleLoraTrainer
from peft_musclelora.row_filter import ROW_FILTER_FILE, RowFilterArguments
from peft_musclelora.weight_averaging import WEIGHT_AVERAGE_DIR, WeightAverage, swapped_in

from .ga_helpers import row_filter_training_args, tiny_bert, token_dataset, trainable_state


def _layer_through(values: list[float], average_of: Callable) -> tuple[torch.nn.Linear, WeightAverage]:
    layer = torch.nn.Linear(3, 2)
    average = average_of(dict(layer.named_parameters()))
    for value in values:
        with torch.no_grad():
            layer.weight.fill_(value)
            layer.bias.fill_(-value)
        average.update()
    return layer, average


def test_exponential_average_is_the_bias_corrected_weighted_mean_of_the_updates():
    values = [0.5, -1.0, 2.0, 4.0]
    decay = 0.9
    _, average = _layer_through(values, lambda params: WeightAverage.exponential(params, decay))
    weights = [decay ** (len(values) - 1 - step) for step in range(len(values))]
    expected = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    assert torch.allclose(average.value()["weight"], torch.full((2, 3), expected))
    assert torch.allclose(average.value()["bias"], torch.full((2,), -expected))
    assert average.updates == len(values)


def test_uniform_average_is_the_plain_mean():
    _, average = _layer_through([1.0, 2.0, 6.0], WeightAverage.uniform)
    assert torch.allclose(average.value()["weight"], torch.full((2, 3), 3.0))


def test_the_first_update_alone_is_its_own_average():
    _, average = _layer_through([7.0], lambda params: WeightAverage.exponential(params, 0.999))
    assert torch.allclose(average.value()["weight"], torch.full((2, 3), 7.0))


def test_the_average_is_kept_in_float32_for_low_precision_weights():
    layer = torch.nn.Linear(2, 2).to(torch.bfloat16)
    average = WeightAverage.exponential(dict(layer.named_parameters()), 0.5)
    average.update()
    assert average.value()["weight"].dtype == torch.float32


def test_swapped_in_puts_the_average_in_and_the_trained_weights_back_bit_for_bit():
    layer, average = _layer_through([1.0, 3.0], WeightAverage.uniform)
    trained = layer.weight.detach().clone()
    with swapped_in(average):
        assert torch.equal(layer.weight, torch.full((2, 3), 2.0))
    assert torch.equal(layer.weight, trained)


def test_swapped_in_restores_the_trained_weights_when_the_block_raises():
    layer, average = _layer_through([1.0, 3.0], WeightAverage.uniform)
    with pytest.raises(RuntimeError, match="inside"):
        with swapped_in(average):
            raise RuntimeError("inside")
    assert torch.equal(layer.weight, torch.full((2, 3), 3.0))


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_a_decay_outside_the_open_unit_interval_is_refused_naming_it(decay):
    with pytest.raises(ValueError, match=f"decay={decay!r}"):
        WeightAverage.exponential(dict(torch.nn.Linear(2, 2).named_parameters()), decay)


def test_the_value_before_any_update_is_refused():
    average = WeightAverage.uniform(dict(torch.nn.Linear(2, 2).named_parameters()))
    with pytest.raises(ValueError, match="no update yet"):
        average.value()


# ---- in the trainer: row_filter_weight_average_decay ----------------------------------------------------------


class _TrajectoryRecorder(TrainerCallback):
    """The trainable weights after every optimizer step."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(trainable_state(model))


def _trainer(tmp_path, decay, **fields) -> tuple[MuScleLoraTrainer, _TrajectoryRecorder]:
    recorder = _TrajectoryRecorder()
    trainer = MuScleLoraTrainer(
        model=tiny_bert(seed=0),
        args=row_filter_training_args(tmp_path, row_filter_weight_average_decay=decay, **fields),
        train_dataset=token_dataset(48, seed=1),
        reference_dataset=token_dataset(40, seed=2),
        eval_dataset=token_dataset(24, seed=3),
        compute_metrics=_accuracy,
        callbacks=[recorder],
    )
    return trainer, recorder


def _accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def _bias_corrected_average(steps: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    weights = [decay ** (len(steps) - 1 - step) for step in range(len(steps))]
    return {name: sum(w * s[name] for w, s in zip(weights, steps)) / sum(weights) for name in steps[0]}


def test_averaging_leaves_training_alone_and_the_run_ends_on_the_average_of_its_steps(tmp_path):
    plain, plain_steps = _trainer(tmp_path / "plain", None)
    plain.train()
    averaged, steps = _trainer(tmp_path / "averaged", 0.8)
    averaged.train()
    assert len(steps.steps) == len(plain_steps.steps) == 6
    for trained, reference in zip(steps.steps, plain_steps.steps):  # the optimizer never saw the average
        for name in trained:
            assert torch.equal(trained[name], reference[name]), name
    expected = _bias_corrected_average(steps.steps, 0.8)
    final = trainable_state(averaged.model)
    for name, value in expected.items():
        assert torch.allclose(final[name], value, atol=1e-6), name
    report = json.loads((tmp_path / "averaged" / "out" / ROW_FILTER_FILE).read_text())["weight_average"]
    assert report == {"decay": 0.8, "updates": 6, "kept": "last average", "checkpoint": None}


def test_evaluations_during_the_run_score_the_average_and_the_best_checkpoint_holds_it(tmp_path):
    trainer, steps = _trainer(
        tmp_path,
        0.5,
        num_train_epochs=2,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
    )
    trainer.train()
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    best_epoch = losses.index(min(losses))
    per_epoch = len(steps.steps) // 2
    expected = _bias_corrected_average(steps.steps[: per_epoch * (best_epoch + 1)], 0.5)
    final = trainable_state(trainer.model)
    for name, value in expected.items():
        assert torch.allclose(final[name], value, atol=1e-6), name
    # The logged loss is the average's: evaluating the final model (the best average) gives the same number.
    assert trainer.evaluate()["eval_loss"] == pytest.approx(losses[best_epoch], abs=1e-5)
    report = trainer.row_filter_report["weight_average"]
    assert report["kept"] == "best checkpoint" and report["checkpoint"].endswith(f"-{per_epoch * (best_epoch + 1)}")


def test_a_resumed_run_goes_on_from_the_trained_weights_and_ends_where_an_unbroken_one_does(tmp_path):
    fields = {"num_train_epochs": 2, "save_strategy": "epoch"}
    unbroken, _ = _trainer(tmp_path / "unbroken", 0.7, **fields)
    unbroken.train()
    first, _ = _trainer(tmp_path / "resumed", 0.7, **fields)
    first.train()
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-6"
    assert (checkpoint / WEIGHT_AVERAGE_DIR / "weights.safetensors").is_file()
    resumed, _ = _trainer(tmp_path / "resumed", 0.7, **fields)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, final = trainable_state(unbroken.model), trainable_state(resumed.model)
    for name in expected:
        assert torch.allclose(final[name], expected[name], atol=1e-6), name


def test_resuming_a_checkpoint_saved_without_averaging_is_refused_in_one_line(tmp_path):
    fields = {"num_train_epochs": 1, "save_strategy": "epoch"}
    plain, _ = _trainer(tmp_path, None, **fields)
    plain.train()
    averaged, _ = _trainer(tmp_path, 0.7, **fields)
    with pytest.raises(ValueError, match="no weight_average/state.json"):
        averaged.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"row_filter": True, "row_filter_weight_average_decay": 1.0}, ValueError, r"decay` must be .*in \(0, 1\)"),
        ({"row_filter": True, "row_filter_weight_average_decay": "0.9"}, TypeError, r"decay` must be .*'0.9'"),
        ({"row_filter": True, "row_filter_weight_average_decay": True}, TypeError, r"decay` must be .*True"),
        ({"row_filter_weight_average_decay": 0.99}, ValueError, r"\(0.99\) .*set row_filter=True"),
    ],
)
def test_invalid_averaging_settings_name_the_field_and_the_value(fields, error, message):
    with pytest.raises(error, match=message):
        RowFilterArguments(**fields)


class _Interrupt(TrainerCallback):
    def __init__(self) -> None:
        self.armed = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.armed and state.global_step == 3:
            raise KeyboardInterrupt


def test_a_run_after_an_interrupted_one_averages_its_own_steps_only(tmp_path):
    trainer, steps = _trainer(tmp_path, 0.8)
    interrupt = _Interrupt()
    trainer.add_callback(interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    interrupt.armed = False
    steps.steps.clear()
    trainer.train()
    expected, final = _bias_corrected_average(steps.steps, 0.8), trainable_state(trainer.model)
    for name, value in expected.items():
        assert torch.allclose(final[name], value, atol=1e-6), name
    assert trainer.row_filter_report["weight_average"]["updates"] == len(steps.steps) > 0
