"""The cells of a bench or curve run: where each lives, when a finished one is reused, and how a failure is kept.

A [`BenchRun`] is what `musclelora bench` / `curve` resolved from the command line once (data, output directory,
model, bench preset, parsed `--set` items). [`run_cell`] runs one (attack, method, seed[, trusted rows]) cell through
the method registry, or reuses the finished cell when its recorded settings are this run's; a failed or inapplicable
cell is recorded (`status: error` / `n/a`) and the run goes on. [`refuse_replacing_finished_cells`] checks the whole
plan before anything trains.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .artefacts import METRICS_FILE, cell_dir, finished_cell, write_json
from .data import ATTACK_INFO_FILE, DEFAULT_TASK, SharedData, attack_labels
from .methods import CellContext, get_method
from .overrides import SetItems, parse_set_items
from .settings import AdapterSettings, TrainingSettings
from .spec import CellSpec, resolve_cell
from .splits import NotApplicable

logger = logging.getLogger(__name__)

NOT_RUN = "not run: no finished cell with these settings (--only-finished)."
CellKey = tuple[str, str, int, Optional[int]]  # attack, method, seed, trusted-row count (curve only)


@dataclass(frozen=True)
class BenchRun:
    """The options of one bench or curve run, resolved once by the command.

    Args:
        shared: The shared data.
        output_dir: The run's output directory (cells under `cells/`).
        model_dir: The local model directory.
        bench_preset: `quick` or `full` (recorded; the quick items are part of `items`).
        items: The parsed `--set` items, the bench preset's first.
        user_items: The `--set` strings the user gave (for the results' heading).
        target_label: The backdoor's target label.
        num_labels: The number of classes; None: found in each attack's training set.
        progress: Progress bars.
        load_in_4bit: NF4 4-bit base model.
        only_finished: Train nothing; unfinished cells are `n/a`.
        overwrite: Replace finished cells trained with other settings.
    """

    shared: SharedData
    output_dir: Path
    model_dir: str
    bench_preset: str
    items: SetItems
    user_items: tuple[str, ...] = ()
    target_label: int = 1
    num_labels: Optional[int] = None
    progress: bool = True
    load_in_4bit: bool = False
    only_finished: bool = False
    overwrite: bool = False

    def spec(self, method: str, trusted: Optional[int] = None) -> CellSpec:
        """The cell specification of `method` in this run."""
        return resolve_cell(method, self.items, trusted)


def with_undefended(cells: list[CellKey]) -> list[CellKey]:
    """The plan's cells plus the undefended `lora` cells that defenses build on (trained on demand by [`run_cell`])."""
    extra = [(a, "lora", s, None) for a, m, s, _ in cells if get_method(m).needs_undefended]
    return list(dict.fromkeys(cells + extra))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _recorded_settings(previous: dict[str, Any], method: str) -> dict[str, Any]:
    """A finished cell's settings: its `cell_settings`, or for a cell written before they were recorded, the ones its
    `bench_overrides` strings resolve to today (the only place recorded strings are parsed again)."""
    if isinstance(previous.get("cell_settings"), dict):
        return _flatten(previous["cell_settings"])
    try:
        return _flatten(resolve_cell(method, parse_set_items(previous.get("bench_overrides"))).settings())
    except ValueError:  # written by a version whose overrides no longer parse
        return {"bench_overrides": previous.get("bench_overrides")}


def _knob_defaults() -> dict[str, Any]:
    """Every preset knob's declared default, keyed as in a flattened `cell_settings`: under `preset.` (the cell's own
    method) and `undefended.` (the `lora` cell a defense builds on)."""
    preset = {"adapter": dataclasses.asdict(AdapterSettings()), "training": dataclasses.asdict(TrainingSettings())}
    return _flatten(json.loads(json.dumps({"preset": preset, "undefended": preset}, default=str)))


def settings_diff(previous: dict[str, Any], run: BenchRun, spec: CellSpec) -> list[str]:
    """What differs between a finished cell's resolved settings and this run's, as `key: old -> new` items.

    A knob the cell's `cell_settings` do not hold was added after the cell was written; at its declared default it
    is not a difference, because a knob is added with the behaviour that existed before it as its default."""
    old = {"bench_preset": previous.get("bench_preset"), "model_dir": previous.get("model_dir")}
    old["load_in_4bit"] = previous.get("load_in_4bit", False)
    old["task"] = previous.get("task", DEFAULT_TASK)  # cells written before tasks were named are SST-2's
    old.update(_recorded_settings(previous, spec.method))
    new = {"bench_preset": run.bench_preset, "model_dir": run.model_dir, "load_in_4bit": run.load_in_4bit}
    new["task"] = run.shared.task
    if run.num_labels is not None:  # found in the data otherwise, and the same data finds the same count
        old["num_labels"], new["num_labels"] = previous.get("num_labels", 2), run.num_labels
    new.update(_flatten(spec.settings()))
    if isinstance(previous.get("cell_settings"), dict):
        defaults = _knob_defaults()
        added = {key: value for key, value in new.items() if key not in old and key in defaults}
        old.update({key: value for key, value in added.items() if defaults[key] == value})
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in {**old, **new} if old.get(key) != new.get(key)]


def refuse_replacing_finished_cells(run: BenchRun, cells: list[CellKey]) -> None:
    """Before anything trains: refuse a plan that would retrain a finished cell with different settings.

    Such a cell is a result someone kept; replacing it silently loses it. `--overwrite` allows it; another
    `--output-dir` keeps both.
    """
    if run.overwrite or run.only_finished:
        return
    for attack, method, seed, trusted in cells:
        directory = cell_dir(run.output_dir, attack, method, seed, trusted)
        previous = finished_cell(directory / METRICS_FILE)
        if previous is None:
            continue
        diff = settings_diff(previous, run, run.spec(method, trusted))
        if diff:
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise ValueError(
                f"{directory}: a finished {method} cell was trained with other settings ({shown}); pass --overwrite "
                "to retrain and replace it, or use another --output-dir to keep both."
            )


def _attack_info(directory: Path) -> dict[str, Any]:
    """What `musclelora poison` recorded about an attack folder it wrote (its label names among it), if it did."""
    path = directory / ATTACK_INFO_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error}).") from None
    out: dict[str, Any] = {"attack_info": info}
    if isinstance(info, dict) and info.get("label_names"):
        out["label_names"] = info["label_names"]
    return out


def run_cell(run: BenchRun, attack: str, method: str, seed: int, trusted: Optional[int] = None) -> dict[str, Any]:
    """Run (or reuse) one cell; returns its metrics with `reused`. A failure is recorded in the cell, not raised."""
    directory = cell_dir(run.output_dir, attack, method, seed, trusted)
    metrics_path = directory / METRICS_FILE
    spec = run.spec(method, trusted)
    previous = finished_cell(metrics_path)
    if previous is not None and not settings_diff(previous, run, spec):
        previous["reused"] = True
        return previous
    extra: dict[str, Any] = {"attack": attack, "bench_preset": run.bench_preset, "bench_overrides": list(spec.items)}
    extra["task"] = run.shared.task
    if run.only_finished:
        return {"status": "n/a", "method": method, "seed": seed, "reason": NOT_RUN, "reused": False, **extra}
    extra["cell_settings"] = spec.settings()
    try:
        files = run.shared.attack_files(attack)
        labels = attack_labels(files, run.num_labels)  # every file's labels checked before anything trains
        labels.check_target(run.target_label)
        extra.update(labels.to_dict())
        extra.update(_attack_info(files.train.parent))
        extra["data_paths"] = {
            "train": str(files.train),
            "dev": str(files.dev),
            "test_clean": str(files.test_clean),
            "test_poison": str(files.test_poison),
            "train_clean": str(files.train_clean) if files.train_clean else None,
        }
        context = CellContext(
            spec,
            files,
            directory,
            model_dir=run.model_dir,
            seed=seed,
            target_label=run.target_label,
            num_labels=labels.num_labels,
            progress=run.progress,
            load_in_4bit=run.load_in_4bit,
            extra={**extra, "method": method},
            undefended=lambda: run_cell(run, attack, "lora", seed),  # shared by every trusted size
        )
        result = get_method(method).run(context)
    except Exception as error:  # a failed or inapplicable cell is recorded and the bench goes on
        not_applicable = isinstance(error, NotApplicable)
        (logger.warning if not_applicable else logger.error)("cell %s/%s/seed%d: %s", attack, method, seed, error)
        result = {"status": "n/a" if not_applicable else "error", "method": method, "seed": seed, **extra}
        if not_applicable:
            result["reason"] = str(error)
        else:
            result.update({"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
        directory.mkdir(parents=True, exist_ok=True)
        write_json(metrics_path, result)
    result["reused"] = False
    return result
