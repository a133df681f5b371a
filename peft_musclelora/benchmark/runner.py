"""Training of one classifier cell: a method preset on a (poisoned) training set, checkpoint by clean-dev accuracy.

[`train_cell`] fine-tunes a local sequence-classification model with a [`MethodPreset`], keeps the checkpoint with
the best clean-dev accuracy, saves the PEFT adapter (safetensors; the whole model for `full`) and writes
`metrics.json` with CACC, ASR, false-target rate, train time, steps, method, preset, data paths, seed and versions.
The model comes from [`peft_musclelora.benchmark.builders`], the scores from
[`peft_musclelora.benchmark.evaluation`], the file layout from [`peft_musclelora.benchmark.artefacts`].

Weights that the base checkpoint lacks (a freshly initialised classifier) are saved beside the adapter in
`initialized_weights.safetensors`, so a reloaded cell has exactly the head it was trained with, frozen or not.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import datasets
import peft
import torch
import transformers
from safetensors.torch import save_file
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

import peft_musclelora
from peft_musclelora import MuScleLoraTrainer, MuScleLoraTrainingArguments

from .artefacts import (
    ADAPTER_DIRNAME,
    CELL_FILE,
    INIT_WEIGHTS_FILE,
    LOG_HISTORY_FILE,
    METRICS_FILE,
    peak_rss_megabytes,
    prepare_output_dir,
    reset_peak_rss,
    save_row_filter,
    staged_cell,
    write_json,
)
from .builders import build_model, default_model_dir, load_cell
from .data import DataSource, LoadedData, as_data
from .evaluation import score
from .presets import get_preset
from .settings import MethodPreset, apply_overrides

__all__ = ["load_cell", "score", "train_cell", "versions"]  # load_cell and score: their old home, still imported


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "peft_musclelora": peft_musclelora.__version__,
    }


def tokenize(data: LoadedData, tokenizer: Any, max_length: int) -> Any:
    """`data` as a tokenized `datasets.Dataset` (`input_ids`, `attention_mask`, `label`)."""
    dataset = data.to_hf_dataset()
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text", "poisoned"],
        desc=f"tokenize {Path(data.source).name[:40]}",
    )


def _compute_accuracy(eval_prediction: Any) -> dict[str, float]:
    logits, labels = eval_prediction
    predictions = logits.argmax(axis=-1)
    return {"accuracy": float((predictions == labels).mean())}


def _trainable_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def train_cell(
    method: Union[str, MethodPreset],
    train: DataSource,
    dev: DataSource,
    output_dir: Union[str, os.PathLike],
    model_dir: Optional[Union[str, os.PathLike]] = None,
    seed: int = 0,
    overrides: Optional[Mapping[str, Any]] = None,
    test_clean: Optional[DataSource] = None,
    test_poison: Optional[DataSource] = None,
    target_label: int = 1,
    num_labels: int = 2,
    progress: bool = True,
    extra: Optional[dict[str, Any]] = None,
    load_in_4bit: bool = False,
    label_names: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """Train `method` on `train`, select by clean-dev accuracy, save the adapter and `metrics.json`.

    Args:
        method: A preset name (see `musclelora presets`) or a [`MethodPreset`].
        train: Training data (path or [`LoadedData`]); usually poisoned.
        dev: Clean dev data for checkpoint selection (GA methods take their references from it).
        output_dir: Where `adapter/` and `metrics.json` go.
        model_dir: Local model directory; the default MiniLM-L6 when None.
        seed: Seed of subsampling, initialisation, data order and the GA reference split.
        overrides: Typed preset overrides, `{leaf field: value}` (e.g. `{"r": 4}`).
        test_clean: Clean test data for CACC and the false-target rate (optional).
        test_poison: Triggered test data for ASR (optional; needs `test_clean`).
        target_label: The backdoor's target label.
        num_labels: Number of classes.
        progress: Show progress bars.
        extra: More fields to record in `metrics.json` (e.g. the bench's attack and preset label).
        load_in_4bit: Load the base model in NF4 4-bit (QLoRA; needs bitsandbytes) and prepare it for k-bit
            training; recorded in the cell so `evaluate` reloads it the same way.
        label_names: For string labels, the value each id stands for; recorded in the cell (`cell.json` and
            `metrics.json`) so that `evaluate` maps a test file's labels the same way.

    Returns:
        The dict written to `metrics.json`.
    """
    preset = get_preset(method) if isinstance(method, str) else method
    preset = apply_overrides(preset, overrides or {})
    training = preset.training
    reset_peak_rss()
    if (test_clean is None) != (test_poison is None):
        raise ValueError("test_clean and test_poison must be given together (or neither).")
    output_dir = prepare_output_dir(output_dir)
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()

    # Every input is read and checked before the first training step: a bad test file found after training would
    # cost the whole run.
    train_data = as_data(train, num_labels).subsample(training.max_train_rows, seed)
    dev_data = as_data(dev, num_labels).subsample(training.max_dev_rows, seed)
    tests = None
    if test_clean is not None and test_poison is not None:
        tests = (
            as_data(test_clean, num_labels).subsample(training.max_test_rows, seed),
            as_data(test_poison, num_labels).subsample(training.max_test_rows, seed),
        )
    cell = _Cell(preset, model_dir, seed, target_label, num_labels, progress, load_in_4bit)
    cell.label_names = list(label_names) if label_names is not None else None
    with staged_cell(output_dir) as work:
        result = cell.train(train_data, dev_data, work, output_dir)
        result["overrides"] = dict(overrides or {})
        if tests is not None:
            result["data"].update({"test_clean": tests[0].summary(), "test_poison": tests[1].summary()})
            result.update(cell.score(*tests))
        result.update(extra or {})
        write_json(work / METRICS_FILE, result)
        return result


class _Cell:
    """One training run of [`train_cell`]: build, train, save, score. Files go into the staging directory; paths are
    recorded as under the published one."""

    def __init__(
        self,
        preset: MethodPreset,
        model_dir: Path,
        seed: int,
        target_label: int,
        num_labels: int,
        progress: bool,
        load_in_4bit: bool,
    ) -> None:
        self.preset, self.model_dir, self.seed = preset, model_dir, seed
        self.target_label, self.num_labels, self.progress, self.load_in_4bit = (
            target_label, num_labels, progress, load_in_4bit,
        )  # fmt: skip
        self.model: Any = None
        self.tokenizer: Any = None
        self.label_names: Optional[list[str]] = None

    def _trainer(self, model: Any, tokenizer: Any, train_data: LoadedData, dev_data: LoadedData, work: Path) -> Any:
        training = self.preset.training
        arg_kwargs = training.training_arguments_kwargs(str(work / "checkpoints"), self.seed)
        arg_kwargs["disable_tqdm"] = not self.progress
        arg_kwargs["dataloader_pin_memory"] = torch.cuda.is_available()  # pinning on CPU only warns, on every cell
        trainer_kwargs: dict[str, Any] = {
            "model": model,
            "train_dataset": tokenize(train_data, tokenizer, training.max_length),
            "eval_dataset": tokenize(dev_data, tokenizer, training.max_length),
            "data_collator": DataCollatorWithPadding(tokenizer),
            "compute_metrics": _compute_accuracy,
        }
        if not training.needs_defended_trainer:
            return Trainer(args=TrainingArguments(**arg_kwargs), **trainer_kwargs)
        reference_seed = training.ga.reference_seed
        arg_kwargs["reference_seed"] = self.seed if reference_seed is None else reference_seed
        return MuScleLoraTrainer(args=MuScleLoraTrainingArguments(**arg_kwargs), **trainer_kwargs)

    def _save(self, model: Any, initialized: dict[str, Any], work: Path) -> None:
        adapter, training = self.preset.adapter, self.preset.training
        adapter_dir = work / ADAPTER_DIRNAME
        model.save_pretrained(str(adapter_dir), safe_serialization=True)
        if initialized and adapter.kind != "full":
            save_file(initialized, str(adapter_dir / INIT_WEIGHTS_FILE))
        cell_info = {
            "model_dir": str(self.model_dir),
            "kind": adapter.kind,
            "num_labels": self.num_labels,
            "target_label": self.target_label,
            "max_length": training.max_length,
            "eval_batch_size": training.per_device_eval_batch_size,
            "load_in_4bit": self.load_in_4bit,
            "classification_head": adapter.classification_head,
            "head_hidden": adapter.head_hidden,
            "head_dropout": adapter.head_dropout,
        }
        if self.label_names is not None:
            cell_info["label_names"] = self.label_names
        write_json(adapter_dir / CELL_FILE, cell_info)

    def train(self, train_data: LoadedData, dev_data: LoadedData, work: Path, output_dir: Path) -> dict[str, Any]:
        """Train, save the adapter and the log history into `work`; the metrics without test scores."""
        preset = self.preset
        model, tokenizer, initialized = build_model(
            preset, self.model_dir, self.num_labels, self.seed, self.load_in_4bit
        )
        trainable, total = _trainable_parameters(model)
        trainer = self._trainer(model, tokenizer, train_data, dev_data, work)
        start = time.perf_counter()
        trainer.train()
        train_time = time.perf_counter() - start
        peak_rss_mb = peak_rss_megabytes()
        self.model, self.tokenizer = trainer.model, tokenizer
        self._save(trainer.model, initialized, work)
        # The per-epoch losses, dev accuracies and, with GA, the `ga/*` means (branch shares, cosine) outlive
        # checkpoints.
        write_json(work / LOG_HISTORY_FILE, trainer.state.log_history)
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        result: dict[str, Any] = {
            "status": "ok",
            "method": preset.name,
            "preset": preset.to_dict(),
            "overrides": {},
            "seed": self.seed,
            "model_dir": str(self.model_dir),
            "adapter_dir": str(output_dir / ADAPTER_DIRNAME),  # where it is once the cell is published
            "data": {"train": train_data.summary(), "dev": dev_data.summary()},
            "train_time_s": round(train_time, 3),
            "peak_rss_mb": peak_rss_mb,
            "load_in_4bit": self.load_in_4bit,
            "steps": int(trainer.state.global_step),
            "best_dev_accuracy": trainer.state.best_metric,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "target_label": self.target_label,
            "versions": versions(),
        }
        if self.label_names is not None:
            result["label_names"] = self.label_names
        if preset.training.needs_defended_trainer:
            result["reference_rows"] = len(getattr(trainer, "reference_dataset", None) or [])
            result["dev_rows_for_selection"] = len(trainer.eval_dataset)
        if preset.training.row_filter.row_filter:
            result["row_filter"] = save_row_filter(trainer.row_filter_report, train_data, work)
        return result

    def score(self, clean: LoadedData, poison: LoadedData) -> dict[str, Any]:
        """CACC, ASR and false-target rate of the trained model."""
        training = self.preset.training
        return score(
            self.model,
            self.tokenizer,
            clean,
            poison,
            self.target_label,
            training.per_device_eval_batch_size,
            training.max_length,
            self.progress,
        )
