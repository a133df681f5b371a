"""Gradient alignment for TRL's `SFTTrainer` (needs the `trl` extra: `pip install peft-musclelora[trl]`)."""

from __future__ import annotations

from dataclasses import dataclass

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as error:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "MuScleLoraSFTTrainer needs TRL: install the `trl` extra with `pip install peft-musclelora[trl]`."
    ) from error

from .gradient_alignment import GradientAlignmentArguments
from .row_filter import RowFilterArguments
from .trainer import GradientAlignmentMixin


@dataclass
class MuScleLoraSFTConfig(SFTConfig, GradientAlignmentArguments, RowFilterArguments):
    """`trl.SFTConfig` plus the fields of [`GradientAlignmentArguments`] (Llama-2 preset: `reference_split_size=128`)
    and of [`RowFilterArguments`] (`row_filter=True`: fit-gap row filtering on each row's completion loss).

    Example:
        >>> config = MuScleLoraSFTConfig(output_dir="out", reference_split_size=128, bf16=False, report_to=[])
        >>> config.gradient_alignment, config.reference_split_size, config.row_filter
        (True, 128, False)
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        epoch_bounded = self.max_steps is None or self.max_steps <= 0
        self.validate_gradient_alignment_args(self.num_train_epochs if epoch_bounded else None)
        self.validate_row_filter_args()


class MuScleLoraSFTTrainer(GradientAlignmentMixin, SFTTrainer):
    """`trl.SFTTrainer` with MuScleLoRA's gradient alignment; see [`GradientAlignmentMixin`].

    Used like `trl.SFTTrainer` plus the `reference_dataset` keyword (the trusted clean rows, in the training set's
    format): `MuScleLoraSFTTrainer(model=model, args=MuScleLoraSFTConfig(output_dir="out"), train_dataset=train,
    reference_dataset=clean)`. There is no runnable example here: a training run needs a causal LM and a
    tokenizer, too long a set-up for a docstring; `tests/test_gradient_alignment.py` trains one on a tiny Llama with a
    word-level tokenizer built offline.
    """
