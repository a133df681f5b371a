"""Configuration of the multi-scale low-rank (MSLR) adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from .peft_type import MUSCLELORA_PEFT_TYPE

InitWeights = Union[bool, Literal["kaiming"]]


class LoraOnlyFeatureError(AttributeError, ValueError):
    """A LoRA-only PEFT utility asked a [`MuScleLoraConfig`] for a LoRA field it does not have.

    It is a `ValueError` for the caller that hit it, and an `AttributeError` so that `getattr(config, name, default)`
    and `hasattr` still see the field as absent.
    """


def _validate_scales(field_name: str, scales: object) -> list[float]:
    # Sets and dicts are refused too: branch j of the stacked factors belongs to the j-th scale, so order matters.
    if isinstance(scales, (str, bytes, set, frozenset, dict)) or not hasattr(scales, "__iter__"):
        raise TypeError(f"`{field_name}` must be a list of positive numbers, got {scales!r}.")
    values = list(scales)
    if not values:
        raise ValueError(f"`{field_name}` must hold at least one scale, got an empty list.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`{field_name}` must hold numbers, got {value!r} in {values!r}.")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"`{field_name}` must hold finite positive numbers, got {value!r} in {values!r}.")
    return [float(value) for value in values]


def _validate_positive_int(field_name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{field_name}` must be an integer >= 1, got {value!r}.")
    if value < 1:
        raise ValueError(f"`{field_name}` must be an integer >= 1, got {value!r}.")


def _validate_number(field_name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"`{field_name}` must be a finite number, got {value!r}.")


def _validate_positive_number(field_name: str, value: object) -> None:
    # lora_alpha scales the adapter's output: 0 trains an adapter that changes nothing, a negative value flips it.
    _validate_number(field_name, value)
    if value <= 0:
        raise ValueError(f"`{field_name}` must be a finite number > 0, got {value!r}.")


@dataclass
class MuScleLoraConfig(PeftConfig):
    """Configuration of a MuScleLoRA (multi-scale low-rank) adapter.

    The field names are those of [`peft.LoraConfig`] wherever the meaning is the same, so a LoRA script switches to
    MuScleLoRA by changing the class name. Every targeted linear map `y = W0 x + b0` becomes

        y = W0 x + b0 + (lora_alpha / r) * sum_j B_j A_j (k_j * x)

    with one rank-`r` branch per scale `k_j`. With `scales=[1.0]` the adapter is exactly LoRA.

    Args:
        r: Rank of each scale's branch. The adapter holds `len(scales) * r` rank-one components in total.
        lora_alpha: Scaling numerator; the summed branches are multiplied by `lora_alpha / r`.
        scales: The radial scales `k_j` applied to the input of each branch.
        scale_pattern: Per-module override of `scales`, keyed by module-name regex, matched like `rank_pattern`.
        init_weights: `True` makes the adapter a no-op at creation (`B = 0`, as LoRA); `"kaiming"` draws both factors
            Kaiming-uniform, as the method's reference implementation does; `False` draws both at random (testing).

    Example:

    ```py
    >>> import peft_musclelora  # registers the tuner with PEFT
    >>> from peft import get_peft_model
    >>> config = peft_musclelora.MuScleLoraConfig(
    ...     task_type="SEQ_CLS",
    ...     r=8,
    ...     lora_alpha=32,
    ...     target_modules=["query", "value", "pooler.dense"],
    ...     scales=[1.0],
    ...     scale_pattern={"pooler.dense": [1, 2, 3, 4, 5, 6, 7, 8, 9]},
    ...     rank_pattern={"pooler.dense": 1},
    ...     alpha_pattern={"pooler.dense": 6},
    ... )
    >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
    ```
    """

    r: int = field(default=8, metadata={"help": "Rank of each scale's low-rank branch."})
    lora_alpha: float = field(
        default=8, metadata={"help": "Scaling numerator: the branches' sum is multiplied by lora_alpha / r."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input, in [0, 1)."})
    scales: list[float] = field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0],
        metadata={"help": "Radial scales k_j: branch j sees k_j * x. [1.0] gives plain LoRA."},
    )
    scale_pattern: dict[str, list[float]] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module scales overriding `scales`, keyed by module-name regex (matched like rank_pattern), "
            "e.g. {'pooler.dense': [1, 2, 3, 4, 5, 6, 7, 8, 9]}."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names or a regex to adapt; 'all-linear' adapts every linear layer but the output head. "
            "When None, the LoRA defaults for the model architecture are used."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude from adaptation."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True when the target stores its weight as (in, out), like GPT-2's Conv1D."},
    )
    bias: Literal["none", "all", "musclelora_only"] = field(
        default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'musclelora_only'."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapters to train and save, e.g. a classification head."},
    )
    init_weights: InitWeights = field(
        default=True,
        metadata={
            "help": "True: B = 0 so the adapter starts as a no-op (LoRA's init). 'kaiming': both factors "
            "Kaiming-uniform (the reference implementation). False: both random (testing only)."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indices of the layers to adapt; all layers when None."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the layer list used with layers_to_transform, e.g. 'layer' or 'layers'."},
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Per-module rank overriding `r`, keyed by module-name regex."},
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Per-module alpha overriding `lora_alpha`, keyed by module-name regex."},
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={"help": "Token indices of the embedding to train sparsely (as in LoraConfig); used by TRL."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MUSCLELORA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

        _validate_positive_int("r", self.r)
        _validate_positive_number("lora_alpha", self.lora_alpha)
        _validate_number("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        self.scales = _validate_scales("scales", self.scales)

        if not isinstance(self.scale_pattern, dict):
            raise TypeError(f"`scale_pattern` must be a dict of regex -> list of scales, got {self.scale_pattern!r}.")
        self.scale_pattern = {
            key: _validate_scales(f"scale_pattern[{key!r}]", value) for key, value in self.scale_pattern.items()
        }
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"`{name}` must be a dict of regex -> value, got {getattr(self, name)!r}.")
        for key, value in self.rank_pattern.items():
            _validate_positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _validate_positive_number(f"alpha_pattern[{key!r}]", value)

        if self.init_weights not in (True, False, "kaiming"):
            raise ValueError(f"`init_weights` must be True, False or 'kaiming', got {self.init_weights!r}.")
        if self.bias not in ("none", "all", "musclelora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'musclelora_only', got {self.bias!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"`layers_pattern` is {self.layers_pattern!r} but `layers_to_transform` is None: set both or neither."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex string.")

    @property
    def use_rslora(self) -> bool:
        # PEFT's LoRA hot-swapping (`peft.utils.hotswap.hotswap_adapter_from_state_dict`) reads `config.use_rslora`
        # without checking the PEFT type; answer with a clear refusal instead of a bare AttributeError.
        raise LoraOnlyFeatureError(
            "MuScleLoRA configs have no `use_rslora` (the scaling is always lora_alpha / r), so LoRA-only PEFT "
            "utilities such as hot-swapping (peft.utils.hotswap) do not support MuScleLoRA adapters. Load the "
            "adapters side by side with `load_adapter` and switch with `set_adapter` instead."
        )

    @property
    def total_rank(self) -> int:
        """Rank of the stacked adapter for the default scales: `len(scales) * r`."""
        return len(self.scales) * self.r
