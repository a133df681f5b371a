"""What a method trains with, as typed dataclasses: [`AdapterSettings`], [`TrainingSettings`], [`MethodPreset`].

[`TrainingSettings`] *holds* the library's own [`peft_musclelora.GradientAlignmentArguments`] (`ga`) and
[`peft_musclelora.row_filter.RowFilterArguments`] (`row_filter`) instead of restating their fields: a field added to
either dataclass reaches the trainer, `--set` and `musclelora presets` without an edit here. Every leaf field of a
preset is settable by its name (`--set min_ref_loss=0.1`, `--set row_filter_folds=3`); see [`settable_fields`] and
[`apply_overrides`]. Strings are parsed into these types once, by [`peft_musclelora.benchmark.overrides`].

Defaults are the setup measured on the default model (MiniLM-L6): max length 64, batch 32, AdamW lr 2e-4, no weight
decay, grad-norm clip 1.0, 3 epochs, checkpoint by clean-dev accuracy. LoRA is r 8 / alpha 32 on peft's default
target modules for the architecture (`query`,`value` for BERT/RoBERTa, `q_proj`,`v_proj` for Llama, `c_attn` for
GPT-2). Gradient alignment defaults to the published BERT-size gates (96 references, warm-up 1 epoch, raw ratio 0.1,
min reference loss 0.4), switched off until a preset turns it on.

Example:
    >>> preset = MethodPreset("demo", "a demo", training=TrainingSettings(ga=PUBLISHED_GA))
    >>> preset.training.ga.reference_split_size, preset.training.ga.gradient_alignment
    (96, False)
    >>> apply_overrides(preset, {"min_ref_loss": 0.1, "r": 4}).training.ga.min_ref_loss
    0.1
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from peft_musclelora.gradient_alignment import GradientAlignmentArguments
from peft_musclelora.row_filter import RowFilterArguments

AdapterKind = Literal["full", "lora", "musclelora"]
ClassificationHead = Literal["default", "mslr"]
HEAD_INITS = {"kaiming": "kaiming", "zero": True, "random": False}

#: What the MSLR head pattern should name per architecture (documentation and error hints).
HEAD_PATTERN_HINTS = {
    "bert": "pooler.dense",
    "roberta": "classifier.dense",
    "gpt2": "score",
    "llama": "score",
}

#: The published BERT-size gradient-alignment gates (MuScleLoRA, ACL 2024), off until a preset turns GA on.
PUBLISHED_GA = GradientAlignmentArguments(
    gradient_alignment=False, reference_split_size=96, ga_warmup_epochs=1.0, max_raw_grad_ratio=0.1, min_ref_loss=0.4
)


@dataclass
class AdapterSettings:
    """What the adapter (PEFT config) of a method is built from."""

    kind: AdapterKind = field(
        default="lora",
        metadata={"help": "'full' (no adapter, every weight trains), 'lora' (peft LoraConfig) or 'musclelora'."},
    )
    r: int = field(default=8, metadata={"help": "LoRA rank on the body's target modules."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha on the body's target modules."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Adapter dropout."})
    target_modules: typing.Optional[list[str]] = field(
        default=None,
        metadata={"help": "Body modules to adapt; None uses peft's LoRA defaults for the model type."},
    )
    freeze_head: bool = field(
        default=False,
        metadata={"help": "Freeze the classification layer at its random init (the reference's choice with LoRA)."},
    )
    head_pattern: typing.Optional[str] = field(
        default=None,
        metadata={
            "help": "Module (name suffix) that gets the multi-scale adapter: pooler.dense (BERT), classifier.dense "
            "(RoBERTa), score (GPT-2/Llama). When it names the classifier itself (score, classifier), that layer "
            "stays frozen at its init and only its MSLR branches train. None: no MSLR."
        },
    )
    head_scales: list[float] = field(
        default_factory=lambda: [float(k) for k in range(1, 10)],
        metadata={"help": "MSLR scales on the head module."},
    )
    head_r: int = field(default=1, metadata={"help": "MSLR inner rank per scale on the head module."})
    head_alpha: float = field(default=6, metadata={"help": "MSLR alpha on the head module."})
    head_init: str = field(
        default="kaiming",
        metadata={"help": "Init of the head's MSLR factors: 'kaiming' (reference), 'zero' (B=0, LoRA) or 'random'."},
    )
    classification_head: ClassificationHead = field(
        default="default",
        metadata={
            "help": "'default': the model's own classifier; 'mslr': replace a decoder's `score` by the reference's "
            "dense(hidden -> head_hidden) -> dropout -> out_proj head (Llama/GPT-2; frozen, saved with the adapter)."
        },
    )
    head_hidden: int = field(default=16, metadata={"help": "Width of the 'mslr' classification head's dense layer."})
    head_dropout: float = field(default=0.1, metadata={"help": "Dropout of the 'mslr' classification head."})

    def __post_init__(self) -> None:
        if self.kind not in typing.get_args(AdapterKind):
            raise ValueError(f"adapter kind must be one of {list(typing.get_args(AdapterKind))}, got {self.kind!r}.")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {list(HEAD_INITS)}, got {self.head_init!r}.")
        if self.head_pattern is not None and self.kind != "musclelora":
            raise ValueError(f"head_pattern {self.head_pattern!r} needs kind 'musclelora', got kind {self.kind!r}.")
        if self.kind == "full" and self.freeze_head:
            raise ValueError("freeze_head=True needs an adapter kind ('lora' or 'musclelora'), got kind 'full'.")
        if self.classification_head not in typing.get_args(ClassificationHead):
            raise ValueError(
                f"classification_head must be one of {list(typing.get_args(ClassificationHead))}, "
                f"got {self.classification_head!r}."
            )
        if self.classification_head == "mslr" and self.kind == "full":
            raise ValueError("classification_head='mslr' needs an adapter kind ('lora' or 'musclelora'), got 'full'.")
        for name in ("r", "head_r", "head_hidden"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        for name in ("lora_alpha", "head_alpha"):  # 0 gives an adapter that changes nothing, < 0 flips it
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


@dataclass
class TrainingSettings:
    """What the `TrainingArguments` (and, with gradient alignment or row filtering, `MuScleLoraTrainingArguments`)
    are built from: the benchmark's own knobs, plus the library's GA and row-filter arguments, held whole."""

    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    max_length: int = field(default=64, metadata={"help": "Tokens per text (longer texts are truncated)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of steps with linear learning-rate warm-up."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers learning-rate schedule."})
    clean_only_epochs: float = field(
        default=20.0,
        metadata={
            "help": "Epochs of the clean-only baseline, which trains on the few trusted rows alone (num_train_epochs "
            "does not apply to it)."
        },
    )
    max_train_rows: typing.Optional[int] = field(default=None, metadata={"help": "Seeded subsample of training."})
    max_dev_rows: typing.Optional[int] = field(default=None, metadata={"help": "Seeded subsample of the dev set."})
    max_test_rows: typing.Optional[int] = field(default=None, metadata={"help": "Seeded subsample of each test set."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Gradient checkpointing (with --load-in-4bit: via prepare_model_for_kbit_training)."},
    )
    ga: GradientAlignmentArguments = field(
        default_factory=lambda: dataclasses.replace(PUBLISHED_GA),
        metadata={"help": "Gradient alignment (the library's arguments); its reference_split_size rows are trusted."},
    )
    row_filter: RowFilterArguments = field(
        default_factory=RowFilterArguments,
        metadata={"help": "Fit-gap row filtering (the library's arguments); trusted rows: ga.reference_split_size."},
    )

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        for name in ("max_train_rows", "max_dev_rows", "max_test_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value!r}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        if self.learning_rate <= 0 or self.num_train_epochs <= 0 or self.clean_only_epochs <= 0:
            raise ValueError(
                "learning_rate, num_train_epochs and clean_only_epochs must be > 0, "
                f"got {self.learning_rate!r}, {self.num_train_epochs!r}, {self.clean_only_epochs!r}."
            )

    @property
    def gradient_alignment(self) -> bool:
        """Whether the method trains with gradient alignment."""
        return self.ga.gradient_alignment

    @property
    def reference_split_size(self) -> int:
        """The trusted clean-dev rows (GA references, row-filter calibration, the `clean-only` training set)."""
        return self.ga.reference_split_size

    def ga_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `MuScleLoraTrainingArguments` for gradient alignment (empty when it is off): every
        field of `ga` but `reference_seed`, which the runner sets to the cell's seed when it is None."""
        if not self.ga.gradient_alignment:
            return {}
        return {f.name: getattr(self.ga, f.name) for f in dataclasses.fields(self.ga) if f.name != "reference_seed"}

    def row_filter_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `MuScleLoraTrainingArguments` for row filtering (empty when it is off): every field of
        `row_filter`; the trusted rows are the GA reference split, so its size and stratification are passed too (with
        GA off when GA is off)."""
        if not self.row_filter.row_filter:
            return {}
        kwargs = {f.name: getattr(self.row_filter, f.name) for f in dataclasses.fields(self.row_filter)}
        if not self.ga.gradient_alignment:
            split = {name: getattr(self.ga, name) for name in ("reference_split_size", "reference_stratify")}
            kwargs.update(gradient_alignment=False, **split)
        return kwargs

    @property
    def needs_defended_trainer(self) -> bool:
        """Whether `MuScleLoraTrainer` (gradient alignment or row filtering) must run this method."""
        return self.ga.gradient_alignment or self.row_filter.row_filter

    def training_arguments_kwargs(self, output_dir: str, seed: int) -> dict[str, Any]:
        """Keyword arguments of `TrainingArguments`: checkpoint each epoch, keep the best by clean-dev accuracy."""
        return {
            "output_dir": output_dir,
            "seed": seed,
            "data_seed": seed,
            "learning_rate": self.learning_rate,
            "num_train_epochs": self.num_train_epochs,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "per_device_eval_batch_size": self.per_device_eval_batch_size,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "warmup_steps": self.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio
            "lr_scheduler_type": self.lr_scheduler_type,
            "optim": "adamw_torch",
            "eval_strategy": "epoch",
            "save_strategy": "epoch",
            "save_only_model": True,
            "save_total_limit": 1,
            "load_best_model_at_end": True,
            "metric_for_best_model": "accuracy",
            "greater_is_better": True,
            "logging_strategy": "epoch",
            "report_to": "none",
            "dataloader_num_workers": 0,
            "label_names": ["labels"],
            "activation_checkpointing": self.gradient_checkpointing,  # transformers 5.23 name of the flag
            **self.ga_kwargs(),
            **self.row_filter_kwargs(),
        }


@dataclass
class MethodPreset:
    """A named method: adapter settings plus training settings.

    Args:
        name: Preset name (what `--method` takes).
        description: One paragraph on what the method is.
        adapter: How the PEFT config is built.
        training: How the training arguments are built.
    """

    name: str = field(metadata={"settable": False})
    description: str = field(metadata={"settable": False})
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)

    def to_dict(self) -> dict[str, Any]:
        """The preset as a JSON-able dict (`training.ga` and `training.row_filter` nested)."""
        return dataclasses.asdict(self)

    def format(self) -> str:
        """A human-readable listing: name, description, then every `key = value` that `--set` accepts."""
        lines = [f"{self.name}: {self.description}"]
        for section in ("adapter", "training"):
            lines.append(f"  [{section}]")
            for name, (path, _) in settable_fields(type(getattr(self, section))).items():
                lines.append(f"    {name} = {json.dumps(_get(getattr(self, section), path))}")
        return "\n".join(lines)


# ---- settable leaf fields -------------------------------------------------------------------------------------


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def settable_fields(cls: type, prefix: tuple[str, ...] = ()) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Every leaf field of the dataclass `cls`, by name: `name -> (path, type)`; nested dataclass fields are walked.

    A field of `cls` itself wins over a nested one of the same name; fields typed `Any` or not in `__init__` are not
    settable, nor are those with `metadata={"settable": False}`.

    Example:
        >>> fields = settable_fields(TrainingSettings)
        >>> fields["learning_rate"][0], fields["min_ref_loss"][0], fields["row_filter_folds"][0]
        (('learning_rate',), ('ga', 'min_ref_loss'), ('row_filter', 'row_filter_folds'))
    """
    hints = typing.get_type_hints(cls)
    own: dict[str, tuple[tuple[str, ...], Any]] = {}
    nested: dict[str, tuple[tuple[str, ...], Any]] = {}
    for f in dataclasses.fields(cls):
        if not f.init or hints[f.name] is Any or not f.metadata.get("settable", True):
            continue
        if _is_dataclass_type(hints[f.name]):
            for name, entry in settable_fields(hints[f.name], (*prefix, f.name)).items():
                nested.setdefault(name, entry)
        else:
            own[f.name] = ((*prefix, f.name), hints[f.name])
    return {**own, **{name: entry for name, entry in nested.items() if name not in own}}


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


T = TypeVar("T")


def apply_overrides(obj: T, values: Mapping[str, Any]) -> T:
    """A copy of the dataclass `obj` with typed leaf `values` (`{leaf name: value}`, see [`settable_fields`]).

    Nested dataclasses are replaced (so their `__post_init__` checks run); `obj` itself is not changed. A name that
    is not a leaf field raises a `ValueError` naming the valid ones.
    """
    if not values:
        return obj
    fields = settable_fields(type(obj))
    grouped: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        if name not in fields:
            raise ValueError(f"--set: unknown key {name!r}; valid keys: {', '.join(fields)}.")
        path = fields[name][0]
        if len(path) == 1:
            grouped[name] = value
        else:
            nested.setdefault(path[0], {})[name] = value
    for section, items in nested.items():
        grouped[section] = apply_overrides(getattr(obj, section), items)
    return dataclasses.replace(obj, **grouped)
