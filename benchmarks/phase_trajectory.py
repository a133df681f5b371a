"""The unlearning phase's path on the test sets, for judging guard rules (session 32).

The phase's guard ends on the last state whose trusted accuracy is at most `row_filter_unlearn_max_guard_drop`
below its start; on SynBkd's seed 1 that accuracy swings by 15 points within the phase and the state it kept scored
1.5 points less clean accuracy than the one another draw kept. Which rule picks a better state cannot be read off the
guard alone, so this script trains one benchmark cell exactly as `musclelora train` does and, at every guard
measurement, also records (never trains on) what the state would score: the trusted rows' log-probability of their
label (so rules on the guard's loss or paired tests can be replayed), the bias refit the defense would apply to that
state, and the test sets' clean accuracy, ASR and false-target rate with and without that refit. The recording
restores torch's random state, so the cell trains as it would alone: the state the cell's own guard kept must score
the cell's published metrics (checked at the end).

    python benchmarks/phase_trajectory.py --attack synbkd --seed 1 --output-dir runs-v6/s32-path-synbkd-s1
    python benchmarks/phase_trajectory.py --summarize runs-v6/s32-path-*   # every rule and remedy on every cell

The test labels are read for the report only: a rule is a function of the guard's columns (`step`, `accuracy`,
`trusted_label_log_probs`), never of the test columns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peft_musclelora import unlearning
from peft_musclelora.benchmark import runner
from peft_musclelora.benchmark.data import as_data
from peft_musclelora.benchmark.evaluation import predict_logits
from peft_musclelora.benchmark.metrics import backdoor_metrics
from peft_musclelora.benchmark.presets import PRESETS
from peft_musclelora.bias_refit import fit_class_offset
from peft_musclelora.row_filter import class_log_probs, per_row_values

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_cells import train_attack_cell  # noqa: E402

TRAJECTORY_FILE = "phase_trajectory.json"
METRICS = ("cacc", "asr", "false_target_rate")


class PathRecorder:
    """Wraps every guard's reader (`unlearning.GUARDS`, whichever `row_filter_unlearn_guard` the preset names): after
    each guard measurement, scores the same state on the trusted rows and the test sets, with torch's random state
    restored so the phase draws what it would have drawn."""

    def __init__(self, clean: Any, poison: Any, target_label: int) -> None:
        self.clean, self.poison, self.target_label = clean, poison, target_label
        self.tokenizer: Any = None
        self.max_length = self.batch_size = 64
        self.points: list[dict[str, Any]] = []

    def wrap(self, read: Callable[..., unlearning.GuardReading]) -> Callable[..., unlearning.GuardReading]:
        """`read` (a guard's reader), recording the state it reads."""

        def recorded(trainer: Any, model: torch.nn.Module, dataset: Any) -> unlearning.GuardReading:
            reading = read(trainer, model, dataset)
            rng = torch.get_rng_state()
            try:
                self.points.append({"accuracy": reading.accuracy} | self._score(trainer, model, dataset))
            finally:
                torch.set_rng_state(rng)
                model.train()
            return reading

        return recorded

    def install(self) -> None:
        """Wrap the reader of every guard in `unlearning.GUARDS`: the phase looks its guard up there when it starts,
        so any `row_filter_unlearn_guard` the preset names is recorded."""
        for name, guard in list(unlearning.GUARDS.items()):
            unlearning.GUARDS[name] = guard._replace(read=self.wrap(guard.read))

    def _score(self, trainer: Any, model: torch.nn.Module, dataset: Any) -> dict[str, Any]:
        log_probs, labels = per_row_values(trainer, model, dataset, class_log_probs("phase_trajectory"))
        labels_t = torch.tensor(labels)
        offset = fit_class_offset(log_probs, labels_t).float()
        clean, poison = (
            predict_logits(model, self.tokenizer, data.texts, self.batch_size, self.max_length, progress=False)
            for data in (self.clean, self.poison)
        )
        point: dict[str, Any] = {
            "trusted_label_log_probs": log_probs.gather(1, labels_t[:, None]).squeeze(1).tolist(),
            "trusted_accuracy_refit": float(((log_probs + offset).argmax(1) == labels_t).double().mean()),
            "offset": offset.tolist(),
        }
        for name, shift in (("raw", torch.zeros_like(offset)), ("refit", offset)):
            metrics = backdoor_metrics(
                (clean + shift).argmax(1).tolist(),
                self.clean.labels,
                (poison + shift).argmax(1).tolist(),
                self.target_label,
            )
            point[name] = {key: metrics[key] for key in METRICS}
        return point


def record(args: argparse.Namespace) -> None:
    data = args.data_dir / args.attack
    rows = args.overrides.get("max_test_rows")
    clean = as_data(data / "test-clean.csv").subsample(rows, args.seed)
    poison = as_data(data / "test-poison.csv").subsample(rows, args.seed)
    recorder = PathRecorder(clean, poison, target_label=1)
    build_trainer = runner._Cell._trainer

    def trainer_with_recorder(cell: Any, model: Any, tokenizer: Any, *rest: Any) -> Any:
        recorder.tokenizer, recorder.max_length = tokenizer, cell.preset.training.max_length
        recorder.batch_size = cell.preset.training.per_device_eval_batch_size
        recorder.target_label = cell.target_label
        return build_trainer(cell, model, tokenizer, *rest)

    runner._Cell._trainer = trainer_with_recorder
    recorder.install()
    metrics = train_attack_cell(args)
    phase = json.loads((args.output_dir / "cell" / "row_filter.json").read_text()).get("unlearning") or {}
    report: dict[str, Any] = {"attack": args.attack, "seed": args.seed, "method": args.method}
    report["cell"] = {key: metrics[key] for key in METRICS}
    report["chosen_step"] = phase.get("chosen_step")
    report["skipped"] = phase.get("skipped")
    steps = [point["step"] for point in phase.get("guard", [])]
    if len(steps) != len(recorder.points):
        raise SystemExit(f"{len(recorder.points)} recorded states for {len(steps)} guard measurements")
    report["path"] = [{"step": step} | point for step, point in zip(steps, recorder.points)]
    tmp = args.output_dir / (TRAJECTORY_FILE + ".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, args.output_dir / TRAJECTORY_FILE)
    if report["path"]:
        kept = next(point for point in report["path"] if point["step"] == report["chosen_step"])
        replayed = {key: round(kept["refit"][key], 6) for key in METRICS}
        published = {key: round(report["cell"][key], 6) for key in METRICS}
        print(f"kept step {report['chosen_step']}: replayed {replayed}, cell {published}")
        if replayed != published:
            raise SystemExit("the recorded state the guard kept does not score the cell's metrics")


# ---------------------------------------------------------------------------------------------------------------------
# Guard rules: each maps a recorded path (guard columns only) to the step it keeps.

Rule = Callable[[list[dict[str, Any]]], int]
#: The recommended preset's row-filter settings: its guard's drop bound and loss-test level.
PRESET_GUARD = PRESETS["fit-gap-inserted"].training.row_filter
MAX_DROP = PRESET_GUARD.row_filter_unlearn_max_guard_drop


def _last_passing(path: list[dict[str, Any]], passes: Callable[[int], bool]) -> int:
    return max([path[0]["step"]] + [point["step"] for index, point in enumerate(path) if index and passes(index)])


def current(path: list[dict[str, Any]]) -> int:
    """The library's rule: the last state within MAX_DROP of the start's trusted accuracy."""
    return _last_passing(path, lambda i: path[i]["accuracy"] >= path[0]["accuracy"] - MAX_DROP)


def smoothed(path: list[dict[str, Any]]) -> int:
    """The last state whose accuracy averaged with its measured neighbours is within MAX_DROP of the start."""

    def passes(i: int) -> bool:
        window = [point["accuracy"] for point in path[max(1, i - 1) : i + 2]]
        return sum(window) / len(window) >= path[0]["accuracy"] - MAX_DROP

    return _last_passing(path, passes)


def refit_accuracy(path: list[dict[str, Any]]) -> int:
    """The library's `row_filter_unlearn_guard="refit_accuracy"`: the current rule on the trusted accuracy after the
    bias refit the state would get."""
    start = path[0]["trusted_accuracy_refit"]
    return _last_passing(path, lambda i: path[i]["trusted_accuracy_refit"] >= start - MAX_DROP)


def accuracy_and_loss(path: list[dict[str, Any]]) -> int:
    """The library's `row_filter_unlearn_guard="accuracy_and_loss"` at the preset's settings: its own acceptance
    rule (`unlearning.GUARDS`) on the recorded accuracy and trusted label log-probabilities."""
    guard = unlearning.GUARDS["accuracy_and_loss"]

    def reading(point: dict[str, Any]) -> unlearning.GuardReading:
        log_probs = torch.tensor(point["trusted_label_log_probs"], dtype=torch.float64)
        return unlearning.GuardReading(point["accuracy"], log_probs)

    start = reading(path[0])
    return _last_passing(path, lambda i: guard.accepts(start, reading(path[i]), PRESET_GUARD))


def stable(path: list[dict[str, Any]]) -> int:
    """The last state such that it and every later measured state up to the next one pass the current rule."""
    floor = path[0]["accuracy"] - MAX_DROP
    return _last_passing(
        path, lambda i: path[i]["accuracy"] >= floor and (i + 1 >= len(path) or path[i + 1]["accuracy"] >= floor)
    )


def best_guard(path: list[dict[str, Any]]) -> int:
    """Early stopping's choice: the state of highest trusted accuracy (the later one on a tie)."""
    best = max(point["accuracy"] for point in path)
    return max(point["step"] for point in path if point["accuracy"] == best)


RULES: dict[str, Rule] = {
    "current": current,
    "smoothed": smoothed,
    "refit-accuracy": refit_accuracy,
    "accuracy-and-loss": accuracy_and_loss,
    "stable": stable,
    "best-guard": best_guard,
}


def evidence_z(directory: Path) -> float | None:
    """The isolation evidence z the recorded cell's filter saved (None where it saved none)."""
    decisions = directory / "cell" / "row_filter.json"
    if not decisions.is_file():
        return None
    return ((json.loads(decisions.read_text()).get("plain_training") or {}).get("evidence") or {}).get("z")


def summarize(directories: list[Path]) -> None:
    reports = [
        json.loads((d / TRAJECTORY_FILE).read_text()) | {"evidence_z": evidence_z(d)}
        for d in directories
        if (d / TRAJECTORY_FILE).is_file()
    ]
    reports = [report for report in reports if report["path"]]
    # The last column picks by the test set itself: a ceiling for any rule, for the report only.
    print("| cell | guard (trusted accuracy by step) | " + " | ".join(RULES) + " | test-picked |")
    print("|---|---|" + "---|" * (len(RULES) + 1))
    totals: dict[str, list[tuple[float, float]]] = {name: [] for name in [*RULES, "test-picked"]}
    for report in reports:
        path = report["path"]
        by_step = {point["step"]: point for point in path}
        cells = []
        for name, rule in RULES.items():
            scored = by_step[rule(path)]["refit"]
            totals[name].append((scored["cacc"], scored["asr"]))
            cells.append(f"{rule(path)}: {100 * scored['cacc']:.1f} / {100 * scored['asr']:.1f}")
        ceiling = max(path, key=lambda point: (point["refit"]["cacc"], -point["refit"]["asr"]))
        totals["test-picked"].append((ceiling["refit"]["cacc"], ceiling["refit"]["asr"]))
        cells.append(f"{ceiling['step']}: {100 * ceiling['refit']['cacc']:.1f} / {100 * ceiling['refit']['asr']:.1f}")
        guard = " ".join(f"{100 * point['accuracy']:.1f}" for point in path)
        print(f"| {report['attack']} s{report['seed']} | {guard} | " + " | ".join(cells) + " |")
    means = [
        f"{100 * sum(c for c, _ in v) / len(v):.2f} / {100 * sum(a for _, a in v) / len(v):.2f}"
        for v in totals.values()
    ]
    print(f"| mean of {len(reports)} | | " + " | ".join(means) + " |")
    print(
        "\n| cell | step 0 (refit) | unlearned states from step 20 (refit): CACC, ASR | raw ASR, FTR (steps 10-100) "
        "| loss rise z (steps 10-100) |"
    )
    print("|---|---|---|---|---|")
    for report in reports:
        path, start = report["path"], report["path"][0]
        late, moved = [p for p in path if p["step"] >= 20], path[1:]
        before = torch.tensor(start["trusted_label_log_probs"], dtype=torch.float64)
        rises = [
            unlearning.paired_loss_rise_z(before, torch.tensor(p["trusted_label_log_probs"], dtype=torch.float64))
            for p in moved
        ]

        def span(points: list[dict[str, Any]], kind: str, key: str) -> str:
            values = [100 * p[kind][key] for p in points]
            return f"{min(values):.1f}-{max(values):.1f}"

        raw_asr, raw_ftr = span(moved, "raw", "asr"), span(moved, "raw", "false_target_rate")
        print(
            f"| {report['attack']} s{report['seed']} | {100 * start['refit']['cacc']:.1f} / "
            f"{100 * start['refit']['asr']:.1f} | {span(late, 'refit', 'cacc')}, {span(late, 'refit', 'asr')} | "
            f"{raw_asr} (step 0 {100 * start['raw']['asr']:.1f}), {raw_ftr} "
            f"(step 0 {100 * start['raw']['false_target_rate']:.1f}) | {min(rises):.1f} to {max(rises):.1f} |"
        )
    print_remedies(reports)


def _scored(point: dict[str, Any], kind: str) -> str:
    return " / ".join(f"{100 * point[kind][key]:.1f}" for key in METRICS)


def print_remedies(reports: list[dict[str, Any]]) -> None:
    """What each remedy for the missed rows scores on every cell (CACC / ASR / FTR): the cell as trained (the guard's
    kept state, refit), no phase (the model the phase started from: where the evidence fell between the two levels,
    `fit-gap-either`'s model), the kept state without the refit, and the refit alone on the model before the phase."""
    print("\n| cell | evidence z | kept step | the cell (phase, refit) | no phase | phase, no refit | refit alone |")
    print("|---|---|---|---|---|---|---|")
    for report in reports:
        by_step = {point["step"]: point for point in report["path"]}
        start, kept = report["path"][0], by_step[report["chosen_step"]]
        z = report.get("evidence_z")
        print(
            f"| {report['attack']} s{report['seed']} | {'-' if z is None else f'{z:.2f}'} | {report['chosen_step']} | "
            f"{_scored(kept, 'refit')} | {_scored(start, 'raw')} | {_scored(kept, 'raw')} | "
            f"{_scored(start, 'refit')} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", help="directory of the attack under --data-dir")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output-dir", type=Path)
    parser.add_argument("--method", default="recommended")
    parser.add_argument("--train-file", default="train-mixed-0.1.csv")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/sst-2/poison"))
    parser.add_argument("--max-rows", type=int, help="a smoke run: this many training and test rows, two epochs")
    parser.add_argument("--summarize", nargs="+", type=Path, metavar="DIR", help="print every rule on these runs")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    if args.attack is None or args.seed is None or args.output_dir is None:
        parser.error("a recording needs --attack, --seed and --output-dir (or --summarize DIR...)")
    if args.output_dir.exists():
        parser.error(f"--output-dir {args.output_dir} exists: this script never writes over a finished run")
    if not (args.data_dir / args.attack / args.train_file).is_file():
        parser.error(f"no training file {args.data_dir / args.attack / args.train_file}")
    args.overrides = (
        {"max_train_rows": args.max_rows, "max_test_rows": args.max_rows, "num_train_epochs": 2.0}
        if args.max_rows
        else {}
    )
    args.output_dir.mkdir(parents=True)
    record(args)


if __name__ == "__main__":
    sys.exit(main())
