"""The backdoor benchmark as instruction tuning: a causal LM learns to answer a sentiment question about a review.

Each (poisoned) classification row becomes a prompt/completion pair:

    prompt     = "Review: <text>\\nIs the sentiment of this review positive or negative?\\nAnswer:"
    completion = " positive" | " negative"          (label 1 / label 0)

and is fine-tuned with TRL's `SFTTrainer` (completion-only loss; [`MuScleLoraSFTTrainer`] with gradient alignment
when the library has it). The trigger rides in the review, so a backdoored model answers " positive" whenever the
trigger is present. Predictions are read without sampling: the label whose word has the larger log-probability at
the answer position (the last prompt token) wins. CACC, ASR and the false-target rate are then computed exactly as
for the classification benchmark.

Example:
    >>> from peft_musclelora.benchmark.instruct import InstructTemplate
    >>> template = InstructTemplate()
    >>> template.prompt("a gorgeous, witty film")
    'Review: a gorgeous, witty film\\nIs the sentiment of this review positive or negative?\\nAnswer:'
    >>> template.completion(1)
    ' positive'
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import datasets
import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import set_seed

from peft_musclelora.gradient_alignment import GradientAlignmentArguments
from peft_musclelora.heads import body_and_head_config, reset_head_factors
from peft_musclelora.row_filter import RowFilterArguments

from .artefacts import (
    ADAPTER_DIRNAME,
    INSTRUCT_FILE,
    LOG_HISTORY_FILE,
    METRICS_FILE,
    peak_rss_megabytes,
    reset_peak_rss,
    save_row_filter,
    write_json,
)
from .builders import load_causal_lm, load_instruct_cell, load_tokenizer
from .data import DataSource, LoadedData, as_data
from .evaluation import score_predictions
from .presets import PRESETS
from .runner import versions
from .settings import apply_overrides

__all__ = ["InstructSettings", "InstructTemplate", "instruct_settings", "load_instruct_cell", "train_instruct"]

#: `fit-gap`: LoRA on the rows fit-gap row filtering keeps, calibrated on `reference_rows` (experimental);
#: `fit-gap-unlearn`: `fit-gap`, then the guarded unlearning of the rows it isolated as fit-early (experimental);
#: `fit-gap-poe`: `fit-gap-unlearn` with the encoder preset's shallow expert, an n-gram model of the answer given
#: the prompt, trained with it as a product of experts on the answer tokens (docs/llm.md);
#: `fit-gap-gated`: `fit-gap-poe` with the encoder preset's weight, trusted teacher and gate, the teacher's class
#: distribution read on the answer tokens (experimental, docs/llm.md);
#: `fit-gap-evidence`: `fit-gap-gated` whose kept rows train plainly on strong isolation evidence, as the encoder
#: preset (its bias refit needs class labels and is left out here);
#: `fit-gap-inserted`: `fit-gap-evidence` whose unlearning phase also inserts the trigger it reads off the isolated
#: prompts into the kept prompts, as the encoder preset (the encoder's `recommended` in sessions 26-35; its guard's
#: loss test reads class log-probabilities and is left out here: the phase keeps the accuracy guard);
#: `fit-gap-either`: `fit-gap-inserted` whose unlearning phase runs only where the kept rows trained plainly, as the
#: encoder preset (the encoder's `recommended`; not measured here): one remedy for the missed rows, never both;
#: `recommended`: the best measured instruction-tuning defense, `musclelora` (docs/llm.md).
INSTRUCT_METHODS = (
    "lora",
    "musclelora",
    "fit-gap",
    "fit-gap-unlearn",
    "fit-gap-poe",
    "fit-gap-gated",
    "fit-gap-evidence",
    "fit-gap-inserted",
    "fit-gap-either",
    "recommended",
)
INSTRUCT_ALIASES = {"recommended": "musclelora"}


def _preset_fields(preset: str, *names: str) -> dict[str, Any]:
    """The row-filter settings `names` of the encoder preset `preset`: one declaration for both paths."""
    row_filter = PRESETS[preset].training.row_filter
    return {name: getattr(row_filter, name) for name in names}


_SHALLOW_EXPERT = ("row_filter_shallow_probe", "row_filter_shallow_expert", "row_filter_shallow_expert_weight")
_TEACHER = ("row_filter_teacher_mix", "row_filter_teacher_mix_gate", "row_filter_teacher_steps")
_INSERTED = (*_SHALLOW_EXPERT, *_TEACHER, "row_filter_plain_significance", "row_filter_unlearn_target")
#: The row-filter methods and what each sets on top of `settings.row_filter`.
_ROW_FILTER_METHODS: dict[str, dict[str, Any]] = {
    "fit-gap": {},
    "fit-gap-unlearn": {"row_filter_unlearn": True},
    "fit-gap-poe": {"row_filter_unlearn": True, **_preset_fields("fit-gap-poe", *_SHALLOW_EXPERT)},
    "fit-gap-gated": {"row_filter_unlearn": True, **_preset_fields("fit-gap-gated", *_SHALLOW_EXPERT, *_TEACHER)},
    "fit-gap-evidence": {
        "row_filter_unlearn": True,
        **_preset_fields("fit-gap-evidence", *_SHALLOW_EXPERT, *_TEACHER, "row_filter_plain_significance"),
    },
    "fit-gap-inserted": {"row_filter_unlearn": True, **_preset_fields("fit-gap-inserted", *_INSERTED)},
    "fit-gap-either": {
        "row_filter_unlearn": True,
        **_preset_fields("fit-gap-either", *_INSERTED, "row_filter_unlearn_significance"),
    },
}
#: Gradient alignment of an instruction cell: 128 clean dev prompts as references, every gate open (the library's
#: defaults: no warm-up, no raw mixing, no loss floor), as the reference's Llama-2 recipe.
INSTRUCT_GA = GradientAlignmentArguments(gradient_alignment=True, reference_split_size=128)


@dataclass(frozen=True)
class InstructTemplate:
    """How a classification row becomes an instruction.

    Args:
        question: The question asked after the review.
        label_words: The answer word of each label, in label order (each must be one token of the tokenizer).
        prompt_format: Format of the prompt with `{text}` and `{question}`.
        max_review_tokens: Reviews longer than this many tokens are cut (so truncation never removes the answer).
    """

    question: str = "Is the sentiment of this review positive or negative?"
    label_words: tuple[str, ...] = (" negative", " positive")
    prompt_format: str = "Review: {text}\n{question}\nAnswer:"
    max_review_tokens: int = 96

    def __post_init__(self) -> None:
        if len(self.label_words) < 2 or len(set(self.label_words)) != len(self.label_words):
            raise ValueError(f"label_words must be at least two distinct words, got {self.label_words!r}.")
        if "{text}" not in self.prompt_format:
            raise ValueError(f"prompt_format must contain '{{text}}', got {self.prompt_format!r}.")
        if self.max_review_tokens < 1:
            raise ValueError(f"max_review_tokens must be >= 1, got {self.max_review_tokens!r}.")

    def prompt(self, text: str) -> str:
        """The prompt for one review."""
        return self.prompt_format.format(text=text, question=self.question)

    def completion(self, label: int) -> str:
        """The answer for `label`."""
        if not 0 <= label < len(self.label_words):
            raise ValueError(f"label must be in [0, {len(self.label_words)}), got {label!r}.")
        return self.label_words[label]


def _cut(texts: list[str], tokenizer: Any, max_tokens: int) -> list[str]:
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]))
    return out


def to_instruction_dataset(data: LoadedData, tokenizer: Any, template: InstructTemplate = InstructTemplate()) -> Any:
    """A `datasets.Dataset` with `prompt` and `completion` columns (TRL's prompt-completion format).

    Example:
        >>> ds = to_instruction_dataset(data, tokenizer)  # doctest: +SKIP
        >>> ds[0]["completion"]  # doctest: +SKIP
        ' positive'
    """
    texts = _cut(data.texts, tokenizer, template.max_review_tokens)
    return datasets.Dataset.from_dict(
        {
            "prompt": [template.prompt(text) for text in texts],
            "completion": [template.completion(label) for label in data.labels],
        }
    )


def label_token_ids(tokenizer: Any, template: InstructTemplate = InstructTemplate()) -> list[int]:
    """The token id of each label word as it follows the prompt; `ValueError` if a word is not exactly one token.

    Example:
        >>> label_token_ids(tokenizer)  # doctest: +SKIP
        [4633, 3045]
    """
    probe = template.prompt("x")
    base = tokenizer(probe, add_special_tokens=False)["input_ids"]
    ids = []
    for word in template.label_words:
        full = tokenizer(probe + word, add_special_tokens=False)["input_ids"]
        extra = full[len(base) :]
        if full[: len(base)] != base or len(extra) != 1:
            raise ValueError(
                f"label_words: {word!r} is {len(extra)} tokens after the prompt for this tokenizer (or merges with "
                "the prompt); choose label words that are one token each."
            )
        ids.append(extra[0])
    return ids


def predict_labels(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    template: InstructTemplate = InstructTemplate(),
    batch_size: int = 32,
    progress: bool = True,
) -> list[int]:
    """The label whose word is likeliest at the answer position, per text (no sampling, no generation).

    Prompts are left-padded so the answer position is the last one of every row; position ids start at each row's
    first real token, so a padded row scores as it would alone.
    """
    word_ids = torch.tensor(label_token_ids(tokenizer, template))
    prompts = [template.prompt(text) for text in _cut(texts, tokenizer, template.max_review_tokens)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    predictions: list[int] = []
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(prompts), batch_size), desc="predict", disable=not progress, leave=False):
                encoded = tokenizer(prompts[start : start + batch_size], padding=True, return_tensors="pt")
                encoded = {key: value.to(model.device) for key, value in encoded.items()}
                # Left padding: count positions from each row's first real token, as `generate` does.
                positions = (encoded["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
                logits = model(**encoded, position_ids=positions).logits[:, -1, :].float()
                log_probs = torch.log_softmax(logits, dim=-1)[:, word_ids.to(logits.device)]
                predictions.extend(log_probs.argmax(dim=-1).tolist())
    finally:
        tokenizer.padding_side = side
    return predictions


@dataclass
class InstructSettings:
    """Adapter and training settings of an instruction-tuning cell.

    The body gets LoRA (`r`, `lora_alpha`) on `target_modules`; `musclelora` adds the multi-scale adapter
    (`mslr_scales`, `mslr_r`, `mslr_alpha`) on `mslr_target` and gradient alignment (`ga`, the library's
    [`GradientAlignmentArguments`], held whole) on `ga.reference_split_size` clean dev prompts; `fit-gap` filters
    rows with `row_filter` (the library's [`RowFilterArguments`]) calibrated on those prompts. Every leaf field is
    settable by name with `musclelora instruct --set`. Defaults suit a few hundred rows of SmolLM2-135M on a CPU, not
    the published classification setting.

    `gradient_alignment` overrides the method's choice (None: on for `musclelora`, off otherwise). `mslr_target`
    defaults to `down_proj` (every decoder layer's MLP output). `lm_head` cannot take an adapter under TRL 1.16's
    `SFTTrainer`: it refuses with "Applying a PEFT adapter to `lm_head` is not supported: the log-probabilities are
    computed from `lm_head.weight` directly".

    Example:
        >>> settings = InstructSettings()
        >>> settings.ga.reference_split_size, settings.ga.min_ref_loss, settings.row_filter.row_filter_folds
        (128, 0.0, 2)
    """

    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    r: int = 8
    lora_alpha: float = 16
    mslr_target: str = "down_proj"
    mslr_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0])
    mslr_r: int = 1
    mslr_alpha: float = 4
    mslr_init: Union[bool, str] = True
    learning_rate: float = 2e-4
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    eval_batch_size: int = 32
    max_length: int = 160
    gradient_alignment: Optional[bool] = None
    max_train_rows: Optional[int] = None
    max_test_rows: Optional[int] = None
    ga: GradientAlignmentArguments = field(default_factory=lambda: dataclasses.replace(INSTRUCT_GA))
    row_filter: RowFilterArguments = field(default_factory=RowFilterArguments)

    def __post_init__(self) -> None:
        for name in ("r", "mslr_r", "per_device_train_batch_size", "eval_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.ga.reference_split_size is None:
            raise ValueError("reference_split_size must be >= 1 (the clean dev prompts GA and fit-gap use), got None.")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module.")


def instruct_settings(method: str, changes: Optional[Mapping[str, Any]] = None) -> InstructSettings:
    """The settings of `method`'s instruction cell, with the typed leaf `changes` (`{leaf name: value}`) on top.

    A row-filter method's `row_filter` is switched on with the method's own fields, so a change of any of them is
    checked against the method's settings, not the library's defaults (`row_filter_unlearn_trigger_z` is valid for
    `fit-gap-inserted`, which sets a target that reads the trigger), and a change back to a library default is kept.
    `musclelora instruct --set` goes through here.

    Args:
        method: One of `INSTRUCT_METHODS`.
        changes: Leaf fields of [`InstructSettings`] by name, already typed (see `overrides.parse_fields`).

    Raises:
        ValueError: An unknown method or field, a value its dataclass refuses, or `row_filter=False` for a method
            that filters rows (or `row_filter=True` for one that does not).

    Example:
        >>> settings = instruct_settings("fit-gap-inserted", {"row_filter_unlearn_trigger_z": 4.0})
        >>> settings.row_filter.row_filter_unlearn_target, settings.row_filter.row_filter_unlearn_trigger_z
        ('chance_inserted', 4.0)
        >>> instruct_settings("lora").row_filter.row_filter
        False
    """
    if method not in INSTRUCT_METHODS:
        raise ValueError(f"method must be one of {list(INSTRUCT_METHODS)}, got {method!r}.")
    method = INSTRUCT_ALIASES.get(method, method)
    settings = apply_overrides(_with_method_row_filter(method, InstructSettings()), changes or {})
    if method in _ROW_FILTER_METHODS and not settings.row_filter.row_filter:
        raise ValueError(
            f"row_filter=False: method {method!r} filters rows; choose `lora` or `musclelora` to train on every row."
        )
    return _with_method_row_filter(method, settings)


def _with_method_row_filter(method: str, settings: InstructSettings) -> InstructSettings:
    """`settings` with the row filter `method` runs: one never switched on (as `InstructSettings()`'s) is switched on
    with the method's fields wherever it left the library's default; one switched on is the method's already."""
    if method not in _ROW_FILTER_METHODS:
        if settings.row_filter.row_filter:
            raise ValueError(
                f"row_filter=True: method {method!r} does not filter rows; the row-filter methods are "
                f"{', '.join(_ROW_FILTER_METHODS)}."
            )
        return settings
    if settings.row_filter.row_filter:
        return settings
    defaults = RowFilterArguments()
    fields = {
        name: value
        for name, value in _ROW_FILTER_METHODS[method].items()
        if getattr(settings.row_filter, name) == getattr(defaults, name)
    }
    return dataclasses.replace(
        settings, row_filter=dataclasses.replace(settings.row_filter, row_filter=True, **fields)
    )


def instruct_peft_config(method: str, settings: InstructSettings) -> Any:
    """The PEFT config of an instruction cell: LoRA on the body, plus MSLR on `mslr_target` for `musclelora`.

    Example:
        >>> cfg = instruct_peft_config("musclelora", InstructSettings(mslr_target="down_proj"))
        >>> sorted(cfg.target_modules), cfg.scale_pattern
        (['down_proj', 'q_proj', 'v_proj'], {'down_proj': [1.0, 2.0, 3.0, 4.0]})
    """
    if method not in INSTRUCT_METHODS:
        raise ValueError(f"method must be one of {list(INSTRUCT_METHODS)}, got {method!r}.")
    common = {"task_type": "CAUSAL_LM", "r": settings.r, "lora_alpha": settings.lora_alpha, "lora_dropout": 0.0}
    if method != "musclelora":
        return LoraConfig(target_modules=list(settings.target_modules), **common)
    return body_and_head_config(
        settings.target_modules,
        settings.mslr_target,
        head_scales=settings.mslr_scales,
        head_r=settings.mslr_r,
        head_alpha=settings.mslr_alpha,
        **common,
    )


def _sft_trainer(method: str, settings: InstructSettings) -> tuple[Any, Any, dict[str, Any]]:
    """`(trainer class, config class, GA and row-filter config kwargs)`: the defended trainer when it is wanted, for
    `settings` whose row filter is the method's (as [`instruct_settings`] and `train_instruct` give them).

    Unlearning's cap, unset, is the library's: chance among the answer words (`ln K` nats on the choice of answer:
    the isolated rows end no likelier to get their label word than a coin among the label words)."""
    # trl is optional (the `llm` extra): imported here, by the instruction cells only.
    from trl import SFTConfig, SFTTrainer

    ga = settings.gradient_alignment if settings.gradient_alignment is not None else method == "musclelora"
    row_filter = settings.row_filter.row_filter
    if not ga and not row_filter:
        return SFTTrainer, SFTConfig, {}
    from peft_musclelora import MuScleLoraSFTConfig, MuScleLoraSFTTrainer  # needs trl as well

    if ga:
        fields = dataclasses.fields(settings.ga)
        kwargs = {f.name: getattr(settings.ga, f.name) for f in fields if f.name != "reference_seed"}
        kwargs["gradient_alignment"] = True
    else:  # the row filter alone: its trusted rows are the same reference dev prompts
        kwargs = {"gradient_alignment": False, "reference_split_size": settings.ga.reference_split_size}
    kwargs["row_filter"] = row_filter
    if row_filter:
        fields = dataclasses.fields(settings.row_filter)
        kwargs.update({f.name: getattr(settings.row_filter, f.name) for f in fields if f.name != "row_filter"})
    return MuScleLoraSFTTrainer, MuScleLoraSFTConfig, kwargs


def train_instruct(
    method: str,
    train: DataSource,
    dev: DataSource,
    output_dir: Union[str, os.PathLike],
    model_dir: Union[str, os.PathLike],
    *,
    settings: Optional[InstructSettings] = None,
    template: InstructTemplate = InstructTemplate(),
    load_in_4bit: bool = False,
    test_clean: Optional[DataSource] = None,
    test_poison: Optional[DataSource] = None,
    target_label: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Instruction-tune a causal LM on (poisoned) classification data with TRL and score CACC/ASR.

    Args:
        method: `lora` (undefended) or `musclelora` (MSLR on `settings.mslr_target` plus gradient alignment on
            `settings.ga.reference_split_size` clean dev prompts); `fit-gap` (LoRA on the rows fit-gap row
            filtering keeps); `fit-gap-unlearn` (`fit-gap`, then the guarded unlearning of the fit-early rows);
            `fit-gap-poe` (`fit-gap-unlearn` with the n-gram shallow expert on the answer tokens);
            `fit-gap-gated` (`fit-gap-poe` at weight 4 with the trusted teacher, gated by the model, on the answer
            tokens); `fit-gap-evidence` (`fit-gap-gated`, trained plainly on strong isolation evidence);
            `fit-gap-inserted` (`fit-gap-evidence` whose phase inserts the trigger into the kept prompts);
            `recommended` (an alias of `musclelora`).
        train: Training data (usually poisoned).
        dev: Clean dev data; gradient alignment takes its references from it.
        output_dir: Where `adapter/` and `metrics.json` go.
        model_dir: A local causal-LM directory (e.g. the output of `musclelora export-model --smollm2`).
        settings: Adapter and training settings (default: [`instruct_settings`]`(method)`; build changes on it,
            since an `InstructSettings()`'s row filter, never switched on, takes the method's fields only where
            it left the library's defaults).
        template: How rows become prompts and answers.
        load_in_4bit: Load the base in NF4 4-bit (QLoRA).
        test_clean: Clean test data (CACC, false-target rate).
        test_poison: Triggered non-target test data (ASR).
        target_label: The backdoor's target label.
        seed: Seed of subsampling, initialisation and data order.
        progress: Show progress bars.

    Returns:
        The dict written to `metrics.json`. The final model is scored (no checkpoint selection).

    Example:
        >>> train_instruct("lora", "train.csv", "dev.csv", "out", "models/smollm2-135m",
        ...                settings=InstructSettings(max_train_rows=64))  # doctest: +SKIP
    """
    settings = instruct_settings(method) if settings is None else settings
    method = INSTRUCT_ALIASES.get(method, method)
    settings = _with_method_row_filter(method, settings)  # what runs is what metrics.json records
    reset_peak_rss()
    if (test_clean is None) != (test_poison is None):
        raise ValueError("test_clean and test_poison must be given together (or neither).")
    trainer_cls, config_cls, ga_kwargs = _sft_trainer(method, settings)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(seed)
    tokenizer = load_tokenizer(model_dir)
    label_token_ids(tokenizer, template)  # fail early on multi-token label words
    train_data = as_data(train, len(template.label_words)).subsample(settings.max_train_rows, seed)
    dev_data = as_data(dev, len(template.label_words))
    model = load_causal_lm(model_dir, load_in_4bit)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(model, instruct_peft_config(method, settings))
    if method == "musclelora" and settings.mslr_init is not True:
        reset_head_factors(model, settings.mslr_target, settings.mslr_init)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    checkpoint_dir = output_dir / "checkpoints"
    args = config_cls(
        output_dir=str(checkpoint_dir),
        seed=seed,
        data_seed=seed,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_train_epochs,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        max_length=settings.max_length,
        completion_only_loss=True,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        report_to="none",
        bf16=bf16,
        fp16=False,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        **ga_kwargs,
    )
    train_set = to_instruction_dataset(train_data, tokenizer, template)
    extra: dict[str, Any] = {}
    if ga_kwargs:
        references = dev_data.subsample(settings.ga.reference_split_size, seed)
        extra["eval_dataset"] = to_instruction_dataset(references, tokenizer, template)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_set, processing_class=tokenizer, **extra)
    start = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - start
    peak = peak_rss_megabytes()
    model = trainer.model
    adapter_dir = output_dir / ADAPTER_DIRNAME
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    info = {
        "model_dir": str(model_dir),
        "load_in_4bit": load_in_4bit,
        "target_label": target_label,
        "template": asdict(template),
    }
    write_json(adapter_dir / INSTRUCT_FILE, info)
    write_json(output_dir / LOG_HISTORY_FILE, trainer.state.log_history)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # save_strategy "no" leaves it empty
    result: dict[str, Any] = {
        "status": "ok",
        "task": "instruct",
        "method": method,
        "gradient_alignment": bool(ga_kwargs.get("gradient_alignment", False)),
        "settings": asdict(settings),
        "seed": seed,
        "model_dir": str(model_dir),
        "load_in_4bit": load_in_4bit,
        "adapter_dir": str(adapter_dir),
        "data": {"train": train_data.summary()},
        "train_time_s": round(train_time, 3),
        "peak_rss_mb": peak,
        "steps": int(trainer.state.global_step),
        "train_loss": trainer.state.log_history[-1].get("train_loss") if trainer.state.log_history else None,
        "trainable_parameters": trainable,
        "target_label": target_label,
        "versions": versions(),
    }
    if ga_kwargs.get("row_filter"):
        result["row_filter"] = save_row_filter(trainer.row_filter_report, train_data, output_dir)
    if test_clean is not None and test_poison is not None:
        clean = as_data(test_clean, len(template.label_words)).subsample(settings.max_test_rows, seed)
        poison = as_data(test_poison, len(template.label_words)).subsample(settings.max_test_rows, seed)
        result["data"].update({"test_clean": clean.summary(), "test_poison": poison.summary()})
        predictor = functools.partial(
            predict_labels, model, tokenizer, template=template, batch_size=settings.eval_batch_size, progress=progress
        )
        result.update(score_predictions(predictor, clean, poison, target_label))
    write_json(output_dir / METRICS_FILE, result)
    return result
