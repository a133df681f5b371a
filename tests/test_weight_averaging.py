"""Running averages of the trainable weights: what they average, and that swapping one in never loses the trained
weights."""

import pytest
import torch

from peft_musclelora.weight_averaging import WeightAverage, swapped_in


def _layer_through(values: list[float], average_of: callable) -> tuple[torch.nn.Linear, WeightAverage]:
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
