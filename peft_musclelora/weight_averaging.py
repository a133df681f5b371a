"""Running averages of a model's trainable weights (exponential or uniform), kept in float32 beside the model.

An average of the weights a run passes through is often a better model than the last of them (Polyak averaging,
SWA: Izmailov et al. 2018; for compact pretrained language models, Lu et al. 2022), and it costs no training. A
[`WeightAverage`] holds one average of a set of named parameters; [`swapped_in`] puts it into the model for as long
as a block runs and restores the trained weights after, so the optimizer never sees the average.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 1, bias=False)
    >>> average = WeightAverage.exponential(dict(layer.named_parameters()), decay=0.5)
    >>> for value in (1.0, 3.0):
    ...     _ = layer.weight.data.fill_(value)
    ...     average.update()
    >>> round(average.value()["weight"][0, 0].item(), 4)  # (0.5 * 1 + 1 * 3) / 1.5: bias-corrected
    2.3333
    >>> with swapped_in(average):
    ...     round(layer.weight[0, 0].item(), 4)
    2.3333
    >>> layer.weight[0, 0].item()
    3.0
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Optional

import torch


class WeightAverage:
    """A running average of `parameters` (name -> parameter), exponential (`decay` in (0, 1)) or uniform (`decay`
    None: every update weighs the same). The exponential average is bias-corrected (as Adam's moments are), so it
    is an average of the updates made so far from the first one, not a blend with zeros."""

    def __init__(self, parameters: Mapping[str, torch.nn.Parameter], decay: Optional[float]) -> None:
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay!r}: an exponential average needs a decay in (0, 1), or None for uniform.")
        self.parameters = dict(parameters)
        self.decay = decay
        self.updates = 0
        self._sum = {name: torch.zeros_like(param, dtype=torch.float32) for name, param in self.parameters.items()}
        self._weight = 0.0

    @classmethod
    def exponential(cls, parameters: Mapping[str, torch.nn.Parameter], decay: float) -> WeightAverage:
        """An exponential moving average with `decay` (the weight of the past at each update)."""
        return cls(parameters, decay)

    @classmethod
    def uniform(cls, parameters: Mapping[str, torch.nn.Parameter]) -> WeightAverage:
        """The plain mean of every update's weights."""
        return cls(parameters, None)

    @torch.no_grad()
    def update(self) -> None:
        """Add the parameters' current values."""
        past = 1.0 if self.decay is None else self.decay
        now = 1.0 if self.decay is None else 1.0 - self.decay
        for name, param in self.parameters.items():
            self._sum[name].mul_(past).add_(param.detach().float(), alpha=now)
        self._weight = self._weight * past + now
        self.updates += 1

    def value(self) -> dict[str, torch.Tensor]:
        """The average, float32, by name; `ValueError` before the first update."""
        if not self.updates:
            raise ValueError("WeightAverage.value(): no update yet, so there is nothing to average.")
        return {name: total / self._weight for name, total in self._sum.items()}


@contextlib.contextmanager
def swapped_in(average: WeightAverage) -> Iterator[None]:
    """Copy `average`'s value into its parameters for the block, then put the trained values back (bit for bit)."""
    trained = {name: param.detach().clone() for name, param in average.parameters.items()}
    with torch.no_grad():
        for name, value in average.value().items():
            average.parameters[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, param in average.parameters.items():
                param.copy_(trained[name])
