"""Would an average of the weights beat the last ones? A paired screen in one training run (session 23).

Trains one benchmark cell exactly as `musclelora train` does (same preset, same seed, same rows: the averages are only
recorded, never trained on or swapped into the run), and beside it keeps running averages of the trainable weights
([`peft_musclelora.weight_averaging`]): exponential ones at several decays and the uniform mean of each epoch's
steps (SWA over the epoch). At each epoch end every variant, the trained weights (`raw`) included, is saved as
safetensors and scored on the dev rows the run selects its checkpoint by. After training, each variant is scored on
the test sets at the last epoch and at the epoch its own dev accuracy selects (first maximum, as the Trainer's
checkpoint selection); `raw` at its selected epoch is the cell itself, a check that nothing was perturbed.

    python benchmarks/weight_average_screen.py --attack stylebkd --seed 3 --output-dir runs-v6/s23-avg-stylebkd-s3
    python benchmarks/weight_average_screen.py --train-file train-clean.csv --attack addsent --seed 3 ...  # unpoisoned

Prints one line per variant and writes `weight_averages.json` into the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from peft_musclelora.benchmark import runner
from peft_musclelora.benchmark.builders import load_cell
from peft_musclelora.benchmark.data import as_data
from peft_musclelora.benchmark.evaluation import score
from peft_musclelora.weight_averaging import WeightAverage, swapped_in

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_cells import train_attack_cell  # noqa: E402

DECAYS = (0.98, 0.99, 0.995, 0.998)


class AverageRecorder(TrainerCallback):
    """Keeps the averages, saves and dev-scores every variant at each epoch end; leaves the run untouched."""

    def __init__(self, trainer: Any, states_dir: Path) -> None:
        self.trainer, self.states_dir = trainer, states_dir
        self.averages: dict[str, WeightAverage] = {}
        self.dev_accuracy: dict[str, list[float]] = {}

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: param for name, param in self.trainer.model.named_parameters() if param.requires_grad}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        parameters = self._parameters()
        self.averages = {f"ema-{decay}": WeightAverage.exponential(parameters, decay) for decay in DECAYS}

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.averages["epoch-mean"] = WeightAverage.uniform(self._parameters())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for average in self.averages.values():
            average.update()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epoch = round(state.epoch)
        self._record("raw", epoch, {name: param.detach().float() for name, param in self._parameters().items()})
        for name, average in self.averages.items():
            with swapped_in(average):
                self._record(name, epoch, average.value())

    def _record(self, variant: str, epoch: int, weights: dict[str, torch.Tensor]) -> None:
        save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(self.path(variant, epoch)))
        self.dev_accuracy.setdefault(variant, []).append(self._dev_accuracy())

    def path(self, variant: str, epoch: int) -> Path:
        return self.states_dir / f"epoch{epoch}-{variant}.safetensors"

    def _dev_accuracy(self) -> float:
        # The trainer's own evaluation draws from torch's global generator (the dataloader's base seed); this one
        # must not, or the next epoch's data order would differ from the cell's.
        rng = torch.get_rng_state()
        model = self.trainer.model
        was_training = model.training
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for batch in self.trainer.get_eval_dataloader():
                batch = self.trainer._prepare_inputs(batch)
                labels = batch.pop("labels")
                predictions = model(**batch).logits.argmax(dim=-1)
                correct += int((predictions == labels).sum())
                total += len(labels)
        model.train(was_training)
        torch.set_rng_state(rng)
        return correct / total


def train_with_recorder(args: argparse.Namespace, states_dir: Path) -> tuple[dict[str, Any], AverageRecorder]:
    recorders: list[AverageRecorder] = []
    build_trainer = runner._Cell._trainer

    def trainer_with_recorder(cell: Any, *call_args: Any, **call_kwargs: Any) -> Any:
        trainer = build_trainer(cell, *call_args, **call_kwargs)
        recorders.append(AverageRecorder(trainer, states_dir))
        trainer.add_callback(recorders[-1])
        return trainer

    runner._Cell._trainer = trainer_with_recorder
    metrics = train_attack_cell(args)
    return metrics, recorders[0]


def score_variants(args: argparse.Namespace, metrics: dict[str, Any], recorder: AverageRecorder) -> dict[str, Any]:
    model, tokenizer, info = load_cell(args.output_dir / "cell" / "adapter")
    parameters = dict(model.named_parameters())
    rows, data = args.overrides.get("max_test_rows"), args.data_dir / args.attack
    clean = as_data(data / "test-clean.csv", 2).subsample(rows, args.seed)
    poison = as_data(data / "test-poison.csv", 2).subsample(rows, args.seed)
    report: dict[str, Any] = {"cell": {key: metrics[key] for key in ("cacc", "asr", "false_target_rate")}}
    for variant, dev in recorder.dev_accuracy.items():
        epochs = {"last": len(dev), "selected": dev.index(max(dev)) + 1}
        scores: dict[str, Any] = {"dev_accuracy": dev}
        for which, epoch in epochs.items():
            weights = load_file(str(recorder.path(variant, epoch)))
            missing = set(weights) - set(parameters)
            if missing:
                raise ValueError(f"the reloaded cell has no parameter {sorted(missing)[0]!r}")
            with torch.no_grad():
                for name, value in weights.items():
                    parameters[name].copy_(value)
            result = score(model, tokenizer, clean, poison, info["target_label"], 64, info["max_length"], False)
            scores[which] = {"epoch": epoch} | {key: result[key] for key in ("cacc", "asr", "false_target_rate")}
        report[variant] = scores
        selected = scores["selected"]
        print(
            f"{variant:10s} dev {' '.join(f'{100 * a:.1f}' for a in dev)} | selected ep{selected['epoch']} "
            f"{100 * selected['cacc']:.1f} / {100 * selected['asr']:.1f} / {100 * selected['false_target_rate']:.1f}"
            f" | last {100 * scores['last']['cacc']:.1f} / {100 * scores['last']['asr']:.1f}",
            flush=True,
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", required=True, help="directory of the attack under --data-dir")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--method", default="recommended")
    parser.add_argument("--train-file", default="train-mixed-0.1.csv", help="train-clean.csv: unpoisoned data")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/sst-2/poison"))
    parser.add_argument("--max-rows", type=int, help="a smoke run: this many training and test rows, two epochs")
    args = parser.parse_args()
    args.overrides = (
        {"max_train_rows": args.max_rows, "max_test_rows": args.max_rows, "num_train_epochs": 2.0}
        if args.max_rows
        else {}
    )
    states_dir = args.output_dir / "states"
    if args.output_dir.exists():
        raise SystemExit(f"--output-dir {args.output_dir} exists: this screen never writes over a finished one")
    states_dir.mkdir(parents=True)
    metrics, recorder = train_with_recorder(args, states_dir)
    report = score_variants(args, metrics, recorder)
    tmp = args.output_dir / "weight_averages.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.output_dir / "weight_averages.json")


if __name__ == "__main__":
    main()
