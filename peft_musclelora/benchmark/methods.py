"""Named, documented method presets for the benchmark: `full`, `lora`, `mslr`, `musclelora`, `ga-lora`,
`ga-lora-tuned` (this project's recipe), and the
decoder-LLM presets `lora-llama` / `musclelora-llama` (the reference's Llama-2 hyper-parameters).

A preset is a [`MethodPreset`]: a name, a description, [`AdapterSettings`] (what the PEFT config is built from) and
[`TrainingSettings`] (what the `TrainingArguments` are built from, including the gradient-alignment knobs). Every
field can be overridden by name with `--set key=value` (see [`MethodPreset.with_overrides`]); values are parsed by
the field's type and an unknown key or a bad value is a one-line `ValueError`.

Defaults are the setup METHOD.md measured on the default model (MiniLM-L6): max length 64, batch 32, AdamW lr 2e-4,
no weight decay, grad-norm clip 1.0, 3 epochs, seed 0, checkpoint by clean-dev accuracy. LoRA is r 8 / alpha 32 on
peft's default target modules for the architecture (`query`,`value` for BERT/RoBERTa, `q_proj`,`v_proj` for Llama,
`c_attn` for GPT-2). The reference recipe freezes the classification layer at its random initialisation when LoRA is
used; `mslr`, `musclelora` and `ga-lora` do that (`freeze_head=True`). `lora` trains the classifier (peft's
`modules_to_save`), the usual LoRA setup; `--set freeze_head=true` gives the reference's frozen-head LoRA.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

AdapterKind = Literal["full", "lora", "musclelora"]
ClassificationHead = Literal["default", "mslr"]
Fallback = Literal["raw", "zero"]  # gradient_alignment.Fallback, restated so that this module does not import torch
HEAD_INITS = {"kaiming": "kaiming", "zero": True, "random": False}

#: What the MSLR head pattern should name per architecture (documentation and error hints).
HEAD_PATTERN_HINTS = {
    "bert": "pooler.dense",
    "roberta": "classifier.dense",
    "gpt2": "score",
    "llama": "score",
}


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
    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Body modules to adapt; None uses peft's LoRA defaults for the model type."},
    )
    freeze_head: bool = field(
        default=False,
        metadata={"help": "Freeze the classification layer at its random init (the reference's choice with LoRA)."},
    )
    head_pattern: Optional[str] = field(
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
    """What the `TrainingArguments` (and, with gradient alignment, `MuScleLoraTrainingArguments`) are built from."""

    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    max_length: int = field(default=64, metadata={"help": "Tokens per text (longer texts are truncated)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of steps with linear learning-rate warm-up."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers learning-rate schedule."})
    gradient_alignment: bool = field(default=False, metadata={"help": "Use MuScleLoraTrainer's gradient alignment."})
    reference_split_size: int = field(
        default=96, metadata={"help": "GA reference rows taken (seeded) from the clean dev set and removed from it."}
    )
    reference_batch_size: Optional[int] = field(
        default=None, metadata={"help": "GA reference batch size; None: the training batch size."}
    )
    ga_warmup_epochs: float = field(default=1.0, metadata={"help": "Epochs of raw-gradient training before GA."})
    max_raw_grad_ratio: float = field(default=0.1, metadata={"help": "GA gate: max raw-gradient ratio."})
    min_ref_loss: float = field(default=0.4, metadata={"help": "GA gate: below this reference loss, no alignment."})
    min_ref_grad_norm: float = field(default=5e-7, metadata={"help": "GA gate: min mean reference-gradient norm."})
    ga_every_n_steps: int = field(default=1, metadata={"help": "Align the gradient every n-th step."})
    reference_dropout: bool = field(
        default=False, metadata={"help": "Keep dropout on in the GA reference pass (the reference implementation)."}
    )
    ga_subspace_size: int = field(
        default=1, metadata={"help": "Project onto the span of the last n reference gradients (1: published)."}
    )
    ga_params: Optional[str] = field(
        default=None, metadata={"help": "Regex: align only matching trainable parameters (None: all)."}
    )
    ga_fallback: Fallback = field(
        default="raw",
        metadata={"help": "GA step without a reference signal: 'raw' keeps the training gradient, 'zero' zeroes it."},
    )
    row_filter: bool = field(
        default=False,
        metadata={
            "help": "Fit-gap row filtering before training (peft_musclelora.row_filter): drop the rows that fold "
            "probes fit better or worse than any trusted row; its trusted rows are the reference_split_size rows."
        },
    )
    row_filter_probe_steps: list[int] = field(
        default_factory=lambda: [16, 32, 64], metadata={"help": "Row filter: probe steps at which rows are scored."}
    )
    row_filter_folds: int = field(default=2, metadata={"help": "Row filter: folds of the training set (>= 2)."})
    row_filter_max_clean_drop: float = field(
        default=0.04, metadata={"help": "Row filter: at most this share of trusted rows may be flagged, in (0, 0.5)."}
    )
    row_filter_probe_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Row filter: the probes' learning rate (None: learning_rate)."}
    )
    clean_only_epochs: float = field(
        default=20.0,
        metadata={
            "help": "Epochs of the clean-only baseline, which trains on the few trusted rows alone (num_train_epochs "
            "does not apply to it)."
        },
    )
    max_train_rows: Optional[int] = field(default=None, metadata={"help": "Seeded subsample of the training set."})
    max_dev_rows: Optional[int] = field(default=None, metadata={"help": "Seeded subsample of the dev set."})
    max_test_rows: Optional[int] = field(default=None, metadata={"help": "Seeded subsample of each test set."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Gradient checkpointing (with --load-in-4bit: via prepare_model_for_kbit_training)."},
    )

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "max_length", "ga_every_n_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        for name in ("max_train_rows", "max_dev_rows", "max_test_rows", "reference_batch_size"):
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

    def ga_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `MuScleLoraTrainingArguments` for gradient alignment (empty when it is off)."""
        if not self.gradient_alignment:
            return {}
        return {
            "gradient_alignment": True,
            "reference_split_size": self.reference_split_size,
            "reference_batch_size": self.reference_batch_size,
            "ga_warmup_epochs": self.ga_warmup_epochs,
            "max_raw_grad_ratio": self.max_raw_grad_ratio,
            "min_ref_loss": self.min_ref_loss,
            "min_ref_grad_norm": self.min_ref_grad_norm,
            "ga_every_n_steps": self.ga_every_n_steps,
            "reference_dropout": self.reference_dropout,
            "ga_subspace_size": self.ga_subspace_size,
            "ga_params": self.ga_params,
            "ga_fallback": self.ga_fallback,
        }

    def row_filter_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `MuScleLoraTrainingArguments` for row filtering (empty when it is off).

        The `row_filter*` fields are named as in `peft_musclelora.RowFilterArguments` and passed by name; the trusted
        rows are the gradient-alignment reference split, so it is passed too (with GA off when GA is off).
        """
        if not self.row_filter:
            return {}
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("row_filter")}
        if not self.gradient_alignment:
            kwargs.update(gradient_alignment=False, reference_split_size=self.reference_split_size)
        return kwargs

    @property
    def needs_defended_trainer(self) -> bool:
        """Whether `MuScleLoraTrainer` (gradient alignment or row filtering) must run this method."""
        return self.gradient_alignment or self.row_filter

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

    name: str
    description: str
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)

    def to_dict(self) -> dict[str, Any]:
        """The preset as a JSON-able dict."""
        return dataclasses.asdict(self)

    def format(self) -> str:
        """A human-readable listing: name, description, then every `key = value` that `--set` accepts."""
        lines = [f"{self.name}: {self.description}"]
        for section in ("adapter", "training"):
            lines.append(f"  [{section}]")
            settings = getattr(self, section)
            for f in dataclasses.fields(settings):
                lines.append(f"    {f.name} = {json.dumps(getattr(settings, f.name))}")
        return "\n".join(lines)

    def with_overrides(self, overrides: Union[dict[str, str], list[str], None]) -> MethodPreset:
        """A copy with `key=value` overrides applied (strings parsed by field type).

        Keys are the field names of [`AdapterSettings`] and [`TrainingSettings`], optionally prefixed by `adapter.`
        or `training.`. Raises a `ValueError` on an unknown key, a malformed `key=value`, or a value of the wrong type.
        """
        if not overrides:
            return self
        pairs = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        changes: dict[str, dict[str, Any]] = {"adapter": {}, "training": {}}
        for key, raw in pairs.items():
            section, name = _locate(key)
            hint = typing.get_type_hints(type(getattr(self, section)))[name]
            changes[section][name] = parse_value(key, raw, hint)
        return MethodPreset(
            name=self.name,
            description=self.description,
            adapter=dataclasses.replace(self.adapter, **changes["adapter"]),
            training=dataclasses.replace(self.training, **changes["training"]),
        )


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def override_keys() -> list[str]:
    """Every key `--set` accepts."""
    return _field_names(AdapterSettings) + _field_names(TrainingSettings)


def _locate(key: str) -> tuple[str, str]:
    section, _, name = key.rpartition(".")
    sections = {"adapter": AdapterSettings, "training": TrainingSettings}
    if section:
        if section not in sections or name not in _field_names(sections[section]):
            raise ValueError(f"--set: unknown key {key!r}; valid keys: {', '.join(override_keys())}.")
        return section, name
    for section_name, cls in sections.items():
        if name in _field_names(cls):
            return section_name, name
    close = difflib.get_close_matches(name, override_keys(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"--set: unknown key {key!r}{hint}; valid keys: {', '.join(override_keys())}.")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """Split `["key=value", ...]` into a dict; raises a `ValueError` on an item without `=` or with an empty key."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected key=value, got {item!r}.")
        pairs[key.strip()] = value.strip()
    return pairs


_NONE = ("none", "null")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_value(key: str, raw: str, hint: Any) -> Any:
    """Parse the string `raw` as the type `hint` (int, float, bool, str, Literal, Optional, list); `ValueError` if not.

    Lists are JSON (`[1, 2, 3]`) or comma-separated (`query,value`); `none`/`null` gives None for Optional fields.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        if raw.strip().lower() in _NONE and type(None) in args:
            return None
        return parse_value(key, raw, inner[0])
    bad = ValueError(f"--set {key}={raw!r}: expected {getattr(hint, '__name__', None) or hint}.")
    if origin is Literal:
        if raw not in args:
            raise ValueError(f"--set {key}={raw!r}: expected one of {list(args)}.")
        return raw
    if origin is list:
        (item_type,) = args
        text = raw.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise bad from None
            if not isinstance(items, list):
                raise bad
            items = [str(item) for item in items]
        else:
            items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise ValueError(f"--set {key}={raw!r}: expected a non-empty list.")
        return [parse_value(key, item, item_type) for item in items]
    if hint is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"--set {key}={raw!r}: expected true or false.")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise bad from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise bad from None
    if hint is str:
        return raw
    raise bad


_COMMON = "Checkpoint by clean-dev accuracy."
#: Gradient alignment with its gates open: the aligned update on every step (warm-up 0, no raw mixing, no loss floor).
_GA_EVERY_STEP: dict[str, Any] = {
    "gradient_alignment": True,
    "ga_warmup_epochs": 0.0,
    "max_raw_grad_ratio": 0.0,
    "min_ref_loss": 0.0,
}
_LLAMA_TRAINING = TrainingSettings(
    learning_rate=1e-5,
    num_train_epochs=5.0,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=32,
    max_length=128,
)

_FIT_GAP_TEXT = (
    "Plain LoRA r 8 / alpha 32 with a trainable classifier, lr 1e-3 (the rate at which LoRA reached the oracle's "
    "clean accuracy at full size), trained on the rows fit-gap filtering keeps: two fold "
    "probes (lr 1e-3) score every training row at steps 16, 32, 64 against 400 trusted clean-dev rows (removed from "
    "dev); a row fitted better (shortcut) or worse (contradicted label) than the trusted rows allow is dropped, "
    "with cut-offs that flag at most 4% of the trusted rows. Per-row decisions in the cell's row_filter.json. "
    "Experimental: at full size it finds too few poisoned rows to defend (docs/row_filter.md). "
)
_FIT_GAP = MethodPreset(
    name="fit-gap",
    description=_FIT_GAP_TEXT + _COMMON,
    adapter=AdapterSettings(kind="lora"),
    training=TrainingSettings(
        learning_rate=1e-3, reference_split_size=400, row_filter=True, row_filter_probe_learning_rate=1e-3
    ),
)

PRESETS: dict[str, MethodPreset] = {
    preset.name: preset
    for preset in (
        MethodPreset(
            name="full",
            description="Full fine-tuning, no adapter: every weight and the classifier train. lr 5e-5 (2e-4, the "
            "LoRA rate, is too high for full fine-tuning). Undefended baseline. " + _COMMON,
            adapter=AdapterSettings(kind="full"),
            training=TrainingSettings(learning_rate=5e-5),
        ),
        MethodPreset(
            name="lora",
            description="Plain LoRA r 8 / alpha 32 on peft's default targets (query,value for BERT); the classifier "
            "trains through modules_to_save (set freeze_head=true for the reference's frozen random head). "
            "Undefended baseline. " + _COMMON,
            adapter=AdapterSettings(kind="lora"),
        ),
        MethodPreset(
            name="mslr",
            description="The MuScleLoRA adapter alone, no gradient alignment: LoRA r 8 / alpha 32 on the body (as "
            "MSLR with scales [1]) plus MSLR scales 1..9, rank 1, alpha 6, Kaiming init on pooler.dense; classifier "
            "frozen at random init (reference). " + _COMMON,
            adapter=AdapterSettings(kind="musclelora", freeze_head=True, head_pattern="pooler.dense"),
        ),
        MethodPreset(
            name="musclelora",
            description="The published recipe: the mslr adapter plus gradient alignment on 96 clean-dev references "
            "(removed from dev), warm-up 1 epoch, max raw-gradient ratio 0.1, min reference loss 0.4, min "
            "reference-gradient norm 5e-7. " + _COMMON,
            adapter=AdapterSettings(kind="musclelora", freeze_head=True, head_pattern="pooler.dense"),
            training=TrainingSettings(gradient_alignment=True),
        ),
        MethodPreset(
            name="ga-lora",
            description="Gradient alignment (published gates, 96 references) on plain LoRA r 8 / alpha 32, "
            "classifier frozen at random init, no multi-scale adapter. " + _COMMON,
            adapter=AdapterSettings(kind="lora", freeze_head=True),
            training=TrainingSettings(gradient_alignment=True),
        ),
        MethodPreset(
            name="ga-lora-tuned",
            description="This project's gradient-alignment recipe for small encoders (docs/results.md): plain LoRA "
            "r 8 / alpha 32 with a trainable classifier, GA on every step (warm-up 0, raw ratio 0, min reference loss "
            "0) with 400 clean-dev references (removed from dev). " + _COMMON,
            adapter=AdapterSettings(kind="lora"),
            training=TrainingSettings(reference_split_size=400, **_GA_EVERY_STEP),
        ),
        _FIT_GAP,
        MethodPreset(
            name="recommended",
            description="The project's recommended defense, the best measured so far (docs/results.md): "
            "ga-lora-tuned with the fail-closed fallback (ga_fallback=zero: a step without a reference signal is not "
            "let through raw). GA on every step with 400 clean-dev references (removed from dev), plain LoRA r 8 / "
            "alpha 32 with a trainable classifier. At full size it ties training on the trusted rows alone; fit-gap, "
            "the experimental row filter, does not defend yet. " + _COMMON,
            adapter=AdapterSettings(kind="lora"),
            training=TrainingSettings(reference_split_size=400, ga_fallback="zero", **_GA_EVERY_STEP),
        ),
        MethodPreset(
            name="lora-llama",
            description="Undefended baseline of the reference's Llama-2 experiments: LoRA r 2 / alpha 8 on "
            "q_proj,v_proj; `score` replaced by dense(hidden -> 16) -> dropout 0.1 -> out_proj, frozen at random "
            "init; lr 1e-5, 5 epochs, batch 16, max length 128 (the reference: 4096, unquantized). Use with a Llama "
            "--model, usually with --load-in-4bit (QLoRA). " + _COMMON,
            adapter=AdapterSettings(
                kind="lora",
                r=2,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj"],
                freeze_head=True,
                classification_head="mslr",
            ),
            training=_LLAMA_TRAINING,
        ),
        MethodPreset(
            name="musclelora-llama",
            description="The published Llama-2 recipe: lora-llama plus MSLR scales 1,2,3,4, rank 1, alpha 4, "
            "Kaiming init on the head's dense layer (score.dense), and gradient alignment on 128 clean-dev "
            "references with warm-up 0, max raw-gradient ratio 0, min reference loss 0 (GA on every step). " + _COMMON,
            adapter=AdapterSettings(
                kind="musclelora",
                r=2,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj"],
                freeze_head=True,
                classification_head="mslr",
                head_pattern="score.dense",
                head_scales=[1.0, 2.0, 3.0, 4.0],
                head_r=1,
                head_alpha=4,
            ),
            training=dataclasses.replace(_LLAMA_TRAINING, reference_split_size=128, **_GA_EVERY_STEP),
        ),
    )
}

#: Overrides of `musclelora bench --preset quick` (labelled quick in outputs): a seeded 2000-row subsample trained
#: 2 epochs at lr 1e-3, the smallest run in which undefended LoRA both learns the task and the backdoor (the 480-row,
#: one-epoch run it replaces left LoRA at chance, predicting the target for everything), and 300 rows of each test
#: set. Dev stays whole: the recommended defense takes its 400 trusted rows from it.
QUICK_OVERRIDES: dict[str, str] = {
    "num_train_epochs": "2",
    "learning_rate": "1e-3",
    "clean_only_epochs": "5",
    "max_train_rows": "2000",
    "max_test_rows": "300",
}


def results_heading(kind: str, preset: str, overrides: Optional[list[str]], quick_note: str) -> list[str]:
    """First lines of a results page: what produced it (`musclelora bench --preset`, and any `--set` overrides).

    A quick run is labelled with `quick_note`; a run with overrides lists them, so a subsample is never shown as the
    presets as defined.
    """
    if preset == "quick":
        title = f"QUICK PRESET ({quick_note})"
    else:
        title = "method presets with overrides" if overrides else "method presets as defined"
    lines = [f"# {kind} ({title})", ""]
    if overrides:
        lines += ["Overrides (`--set`): " + ", ".join(f"`{item}`" for item in overrides) + ".", ""]
    return lines


def get_preset(name: str, overrides: Union[dict[str, str], list[str], None] = None) -> MethodPreset:
    """The preset called `name`, with optional `key=value` overrides; `ValueError` for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(PRESETS)}.")
    return PRESETS[name].with_overrides(overrides)
