"""`musclelora analyze`: frequency analysis of fine-tuning on a poisoned data set, and its figures.

Two modes:

- **Render** saved logs: `--log DIR_OR_FILE [--compare-log DIR_OR_FILE]` writes the four-panel heatmap, the error
  curves at one delta and (with `--compare-log`) the side-by-side comparison as PNGs.
- **Train and record**: `--method PRESET --attack ATTACK` fine-tunes one of the benchmark's method presets (see
  `musclelora presets`; the model and adapter are built exactly as `musclelora train` builds them) on
  `train-mixed-0.1.csv` of the attack with a [`FrequencyAnalysisCallback`] on `dev-clean.csv` / `dev-poison.csv`,
  then renders the figures. Methods with gradient alignment take their references (seeded) out of the clean dev
  rows, which the analysis then leaves out: the same seeded split (`peft_musclelora.trainer.reference_split_indices`)
  a bench cell of the same seed makes. `--learning-rate`, `--epochs` and `--batch-size` replace the preset's.

For example, `musclelora analyze --method lora --attack badnets --max-train-rows 2000 --output-dir
runs/freq-badnets-lora`, then `musclelora analyze --log runs/freq-badnets-mslr --compare-log runs/freq-badnets-lora`
(`python -m peft_musclelora.benchmark.analyze` takes the same options).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from peft_musclelora import MuScleLoraTrainer, MuScleLoraTrainingArguments
from peft_musclelora.frequency import FrequencyAnalysisCallback, FrequencyAnalyzer, load_frequency_log
from peft_musclelora.plotting import plot_comparison, plot_error_curves, plot_frequency_heatmap

from ..builders import build_model, default_model_dir
from ..data import SharedData, attack_labels, load_records
from ..overrides import parse_preset_items
from ..presets import PRESETS, get_preset
from ..runner import tokenize
from ..splits import split_trusted
from .options import add_data_options, add_set_option, seed_type


def add_analyze_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `analyze` subcommand to an `argparse` subparsers object and return its parser.

    Example:
        >>> parser = argparse.ArgumentParser(prog="musclelora")
        >>> _ = add_analyze_parser(parser.add_subparsers(dest="command"))
        >>> parser.parse_args(["analyze", "--log", "runs/x"]).log
        'runs/x'
    """
    parser = subparsers.add_parser(
        "analyze",
        help="Frequency analysis: render figures from saved logs, or fine-tune with the frequency callback on.",
        description=__doc__.split("\n\n")[0],
    )
    _add_arguments(parser)
    parser.set_defaults(func=run_analyze)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    render = parser.add_argument_group("render saved logs")
    render.add_argument("--log", help="Run directory or frequency_log.json to render (render mode).")
    render.add_argument("--compare-log", help="A second log, drawn beside --log in a comparison figure.")
    render.add_argument("--label", help="Name of --log in the figures (default: its directory name).")
    render.add_argument("--compare-label", help="Name of --compare-log in the figures.")
    render.add_argument("--delta", type=float, default=None, help="Delta of the curves (default: the log's summary).")
    render.add_argument(
        "--relative-to-start", action="store_true", help="Also draw curves divided by their value at step 0."
    )
    render.add_argument("--figures-dir", help="Where to write PNGs (default: the log's directory / --output-dir).")

    train = parser.add_argument_group("fine-tune and record")
    train.add_argument("--method", choices=list(PRESETS), help="Method preset to fine-tune (train mode).")
    add_set_option(
        train, "Override a preset field, repeatable (see `musclelora presets`), e.g. reference_split_size=200."
    )
    train.add_argument("--attack", default="badnets", help="Folder under <data>/<task>/poison (default: badnets).")
    add_data_options(train)
    train.add_argument("--model", default=None, help="Local model directory (default: the packaged MiniLM-L6).")
    train.add_argument("--max-train-rows", type=int, default=2000, help="Seeded subset of the training rows.")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--learning-rate", type=float, default=2e-4)
    train.add_argument("--max-length", type=int, default=64)
    train.add_argument("--every-n-steps", type=int, default=5)
    train.add_argument("--samples", type=int, default=500, help="Samples per dev set for the analysis.")
    train.add_argument("--distance-scale", choices=("raw", "mean"), default="raw")
    train.add_argument("--output", choices=("probs", "logits"), default="probs", help="The analysed function f.")
    train.add_argument("--output-dir", help="Run directory for the logs and figures.")
    train.add_argument("--seed", type=seed_type, default=0, help="Seed of every random choice (default 0)")
    train.add_argument("--target-label", type=int, default=1, help="The backdoor's target label (default 1)")


def _train(args: argparse.Namespace) -> Path:
    preset = get_preset(args.method, parse_preset_items(args.overrides))
    output_dir = Path(args.output_dir or f"runs/freq-{args.attack}-{args.method}")
    shared = SharedData.resolve(args.data, args.task)
    shared.check_task()
    files = shared.attack_files(args.attack)
    labels = attack_labels(files, args.num_labels)
    labels.check_target(args.target_label)
    num_labels = labels.num_labels
    train = load_records(files.train, num_labels).subsample(args.max_train_rows or None, args.seed)
    clean = load_records(files.dev, num_labels)
    backdoor = load_records(files.dev_poison, num_labels).records

    model, tokenizer, _ = build_model(preset, args.model or default_model_dir(), num_labels=num_labels, seed=args.seed)
    arguments = {
        "output_dir": str(output_dir),
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "logging_steps": args.every_n_steps,
        "save_strategy": "no",
        "report_to": [],
        "seed": args.seed,
        "use_cpu": not torch.cuda.is_available(),
        "disable_tqdm": True,
    }
    trainer_kwargs: dict[str, Any] = {}
    if preset.training.gradient_alignment:
        ga_kwargs = preset.training.ga_kwargs()
        size, stratify = ga_kwargs.pop("reference_split_size"), ga_kwargs.pop("reference_stratify")
        references, clean = split_trusted(clean, size, args.seed, stratify)
        trainer_cls, arguments_cls = MuScleLoraTrainer, MuScleLoraTrainingArguments
        arguments.update(ga_kwargs)
        trainer_kwargs["reference_dataset"] = tokenize(references, tokenizer, args.max_length)
    else:
        trainer_cls, arguments_cls = Trainer, TrainingArguments

    analyzer = FrequencyAnalyzer.from_texts(
        tokenizer,
        clean.texts,
        clean.labels,
        [r.text for r in backdoor],
        target_label=args.target_label,
        samples=args.samples,
        seed=args.seed,
        max_length=args.max_length,
        distance_scale=args.distance_scale,
        output=args.output,
        num_labels=num_labels,
    )
    trainer = trainer_cls(
        model=model,
        args=arguments_cls(**arguments),
        train_dataset=tokenize(train, tokenizer, args.max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[FrequencyAnalysisCallback(analyzer, every_n_steps=args.every_n_steps)],
        **trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.train()
    print(f"trained {args.method} on {args.attack} ({len(train)} rows) in {time.perf_counter() - start:.0f} s")
    return output_dir


def _render(log: str, args: argparse.Namespace, figures_dir: Optional[Path] = None) -> list[Path]:
    log_path = Path(log)
    data = load_frequency_log(log_path)
    base = log_path if log_path.is_dir() else log_path.parent
    out = Path(args.figures_dir) if args.figures_dir else (figures_dir or base)
    label = args.label or base.name
    paths = [
        plot_frequency_heatmap(data, out / f"{label}-heatmap.png", title=label),
        plot_error_curves(data, out / f"{label}-curves.png", delta=args.delta, title=label),
    ]
    relative = getattr(args, "relative_to_start", False)
    if relative:
        paths.append(
            plot_error_curves(
                data, out / f"{label}-curves-relative.png", delta=args.delta, title=label, relative_to_start=True
            )
        )
    if args.compare_log:
        other = Path(args.compare_log)
        other_label = args.compare_label or (other if other.is_dir() else other.parent).name
        paths.append(
            plot_comparison(
                data,
                load_frequency_log(other),
                out / f"{label}-vs-{other_label}.png",
                labels=(label, other_label),
                delta=args.delta,
            )
        )
        if relative:
            paths.append(
                plot_comparison(
                    data,
                    load_frequency_log(other),
                    out / f"{label}-vs-{other_label}-relative.png",
                    labels=(label, other_label),
                    delta=args.delta,
                    relative_to_start=True,
                )
            )
    return paths


def run_analyze(args: argparse.Namespace) -> int:
    """Run the `analyze` subcommand; returns the process exit status (0 on success, 2 on a usage error)."""
    if args.log is None and args.method is None:
        print("analyze: give --log DIR_OR_FILE to render, or --method {lora,mslr} to fine-tune.", file=sys.stderr)
        return 2
    if args.log is not None and args.method is not None:
        print("analyze: --log (render) and --method (train) are separate modes; give one.", file=sys.stderr)
        return 2
    try:
        if args.method is not None:
            run_dir = _train(args)
            paths = _render(str(run_dir), argparse.Namespace(**{**vars(args), "compare_log": None}))
        else:
            paths = _render(args.log, args)
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"analyze: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `python -m peft_musclelora.benchmark.analyze` (the `analyze` options, without a subcommand)."""
    parser = argparse.ArgumentParser(prog="python -m peft_musclelora.benchmark.analyze", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_arguments(parser)
    return run_analyze(parser.parse_args(argv))


def register(subparsers: Any) -> None:
    """Add the `analyze` command."""
    add_analyze_parser(subparsers)


run = run_analyze
