"""Running averages of a model's trainable weights (exponential or uniform), kept in float32 beside the model.

An average of the weights a run passes through is often a better model than the last of them (Polyak averaging,
SWA: Izmailov et al. 2018; for compact pretrained language models, Lu et al. 2022), and it costs no training. A
[`WeightAverage`] holds one average of a set of named parameters; [`swapped_in`] puts it into the model for as long
as a block runs and restores the trained weights after, so the optimizer never sees the average.

In a Trainer (`row_filter_weight_average_decay`), [`WeightAverageCallback`] keeps the average of the weights after
each optimizer step; the trainer evaluates and checkpoints the average in place of the trained weights (so checkpoint
selection compares averages), saves both into each checkpoint (`weight_average/`, safetensors + JSON) so a resumed
run goes on from the trained weights, and ends on the selected average. On the defended MiniLM of this project's
benchmark it did not help (docs/results.md, session 23), so no preset uses it.

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
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

#: Where a checkpoint keeps the average and the trained weights (the checkpoint's model weights are the average).
WEIGHT_AVERAGE_DIR = "weight_average"
STATE_FILE = "state.json"
TENSORS_FILE = "weights.safetensors"


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

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        """Put the average into its parameters (in their own dtype), for good."""
        for name, value in self.value().items():
            self.parameters[name].copy_(value)

    def save(self, folder: str) -> None:
        """Write the average's state and the parameters' current (trained) values into `folder`."""
        os.makedirs(folder, exist_ok=True)
        tensors = {f"sum.{name}": total.contiguous() for name, total in self._sum.items()}
        tensors |= {f"trained.{name}": p.detach().float().cpu().contiguous() for name, p in self.parameters.items()}
        save_file(tensors, os.path.join(folder, TENSORS_FILE))
        state = {"decay": self.decay, "updates": self.updates, "weight": self._weight, "names": list(self._sum)}
        with open(os.path.join(folder, STATE_FILE), "w") as file:
            json.dump(state, file, indent=2)

    @torch.no_grad()
    def load(self, folder: str) -> None:
        """Restore what [`save`] wrote: the average's state, and the trained values into the parameters. A folder
        saved for other parameters or another decay raises a `ValueError` naming it."""
        with open(os.path.join(folder, STATE_FILE)) as file:
            state = json.load(file)
        if state["names"] != list(self._sum) or state["decay"] != self.decay:
            raise ValueError(
                f"{folder} holds a weight average of decay {state['decay']!r} over other parameters than this run's "
                f"(decay {self.decay!r}): resume with the model and row_filter_weight_average_decay it was made for."
            )
        tensors = load_file(os.path.join(folder, TENSORS_FILE))
        for name, param in self.parameters.items():
            self._sum[name].copy_(tensors[f"sum.{name}"])
            param.copy_(tensors[f"trained.{name}"].to(device=param.device, dtype=param.dtype))
        self.updates, self._weight = state["updates"], state["weight"]


@contextlib.contextmanager
def swapped_in(average: WeightAverage) -> Iterator[None]:
    """Copy `average`'s value into its parameters for the block, then put the trained values back (bit for bit)."""
    trained = {name: param.detach().clone() for name, param in average.parameters.items()}
    average.copy_to_parameters()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, param in average.parameters.items():
                param.copy_(trained[name])


class WeightAverageCallback(TrainerCallback):
    """Keeps an exponential [`WeightAverage`] of `parameters()` (the trainable parameters) over a Trainer's run:
    started at the run's first step (unless [`resume`] restored one), updated after every optimizer step.
    `average` is None outside a run."""

    def __init__(self, decay: float, parameters: Callable[[], Mapping[str, torch.nn.Parameter]]) -> None:
        self.decay, self.parameters = decay, parameters
        self.average: Optional[WeightAverage] = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.average is None:
            self.average = WeightAverage.exponential(self.parameters(), self.decay)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.average is not None:
            self.average.update()

    def resume(self, checkpoint_dir: str) -> None:
        """Restore the average and the trained weights saved in `checkpoint_dir` (a checkpoint's model weights are
        the average, not what training goes on from)."""
        folder = os.path.join(checkpoint_dir, WEIGHT_AVERAGE_DIR)
        if not os.path.isfile(os.path.join(folder, STATE_FILE)):
            raise ValueError(
                f"{checkpoint_dir} has no {WEIGHT_AVERAGE_DIR}/{STATE_FILE}: it was not saved with "
                "row_filter_weight_average_decay, so its weights cannot be told from an average; resume without it."
            )
        self.average = WeightAverage.exponential(self.parameters(), self.decay)
        self.average.load(folder)

    def swapped_in(self) -> contextlib.AbstractContextManager[None]:
        """[`swapped_in`] of the average during a run (after its first update); a no-op otherwise."""
        if self.average is None or not self.average.updates:
            return contextlib.nullcontext()
        return swapped_in(self.average)
