"""One bench cell of any method: a preset, a baseline (`clean-only`, `oracle`) or a classic defense.

[`run_method`] is what `musclelora bench` runs per (attack, method, seed). Every cell writes the same
`metrics.json` fields (status, CACC, ASR, false-target rate, train time) plus what the method adds:

* `clean-only` — undefended LoRA (`lora` preset, `clean_only_epochs` = 20 epochs by default) trained on the
  trusted rows alone: exactly the `reference_split_size` rows gradient alignment would use as references (same
  seeded split, [`split_trusted`]), removed from dev; the checkpoint is chosen on the rest of clean dev.
* `oracle` — `lora` trained on the attack's `train-clean.csv` (the unpoisoned training set, which no defender has);
  its ASR is the floor a backdoor-free model reaches. n/a when the data has no such file.
* filters (`zdefence`, `bki`, `cube`) — the filter sees the (subsampled) poisoned training set, `lora` is trained
  on the kept rows; `bki`/`cube` first need the undefended `lora` model (reused from the bench's `lora` cell).
  Adds rows removed and, from the poison flags, poisoned recall and removal precision.
* detectors (`strip`, `rap`, `onion`) — on the undefended `lora` model, threshold on clean dev at a fixed FRR;
  ASR counts the triggered test rows that pass the detector *and* are predicted as the target; FRR is the share of
  clean test rows rejected. ONION instead removes the flagged words and the model predicts on the cleaned texts.

`train_time_s` of a defense is everything it costs end to end: the undefended training it needs, its own work
(scoring, clustering, fitting on dev, screening the test sets) and any retraining; the parts are recorded too.
A method asked for what the data lacks raises [`NotApplicable`]; the bench records `n/a` with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from .data import AttackFiles, LoadedData, load_records
from .methods import PRESETS, get_preset, parse_value
from .splits import NotApplicable, split_trusted

BASELINES = ("clean-only", "oracle")
_FILTER_NEEDS_MODEL = ("bki", "cube")


def defense_names() -> list[str]:
    """Bench names of the classic defenses."""
    from .defenses import DEFENSES

    return list(DEFENSES)


def method_names() -> list[str]:
    """Every method `musclelora bench --methods` accepts."""
    return list(PRESETS) + list(BASELINES) + defense_names()


def split_overrides(overrides: Optional[list[str]]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Split `--set` items into the items for every method and the per-method ones (`<method>.<field>=value`).

    A per-method item is a defense option for a defense (`onion.frr=0.1`) and a preset override for any other
    method (`full.learning_rate=5e-5`: only the `full` cells train at that rate); see [`method_overrides`].

    Example:
        >>> split_overrides(["r=4", "onion.frr=0.1", "full.learning_rate=5e-5"])
        (['r=4'], {'onion': {'frr': '0.1'}, 'full': {'learning_rate': '5e-5'}})
    """
    names = set(method_names())
    preset: list[str] = []
    options: dict[str, dict[str, str]] = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        prefix, dot, name = key.strip().partition(".")
        if sep and dot and prefix in names:
            options.setdefault(prefix, {})[name] = value.strip()
        else:
            preset.append(item)
    return preset, options


def method_overrides(method: str, overrides: Optional[list[str]]) -> tuple[list[str], dict[str, str]]:
    """The preset overrides a cell of `method` trains with, and its raw defense options.

    Items for every method come first, then the method's own (`<method>.<field>=value`), so the method's own win.
    Baselines and defenses train the `lora` preset with these overrides.

    Example:
        >>> method_overrides("full", ["learning_rate=1e-3", "full.learning_rate=5e-5", "onion.frr=0.1"])
        (['learning_rate=1e-3', 'learning_rate=5e-5'], {})
    """
    common, options = split_overrides(overrides)
    own = options.get(method, {})
    if method in defense_names():
        return common, own
    return common + [f"{key}={value}" for key, value in own.items()], {}


def defense_options(defense: str, raw: dict[str, str]) -> dict[str, Any]:
    """Parse `--set <defense>.<field>=value` strings by the defense's field types; `ValueError` on an unknown field."""
    from .defenses import DEFENSES

    cls = DEFENSES[defense][0]
    hints = typing.get_type_hints(cls)
    settable = [f.name for f in dataclasses.fields(cls) if f.init and hints[f.name] is not Any]
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in settable:
            raise ValueError(f"--set {defense}.{name}: unknown field; {defense} takes {', '.join(settable)}.")
        out[name] = parse_value(f"{defense}.{name}", value, hints[name])
    return out


def check_method(method: str, overrides: Optional[list[str]] = None) -> None:
    """Raise a one-line `ValueError` for an unknown method, override or per-method option."""
    if method not in method_names():
        raise ValueError(f"unknown method {method!r}; available: {', '.join(method_names())}.")
    for name in [method, *split_overrides(overrides)[1]]:
        preset_overrides, options = method_overrides(name, overrides)
        get_preset(name if name in PRESETS else "lora", preset_overrides)
        if options:
            defense_options(name, options)


def cell_settings(method: str, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Everything a cell of `method` trains and defends with, resolved from its `--set` items.

    Two override lists that resolve to the same settings give the same cell, whatever their order or the fields the
    method ignores (`clean-only` trains for `clean_only_epochs`, so `num_train_epochs` does not change it; another
    defense's options do not change this one's). The bench reuses a finished cell on that test.

    Example:
        >>> cell_settings("clean-only", ["num_train_epochs=2"]) == cell_settings("clean-only", [])
        True
    """
    preset_overrides, options = method_overrides(method, overrides)
    preset = get_preset(method if method in PRESETS else "lora", preset_overrides)
    settings: dict[str, Any] = {"method": method, "preset": preset.to_dict()}  # a copy: the registry stays as is
    if method == "clean-only":
        training = settings["preset"]["training"]
        training["num_train_epochs"] = training["clean_only_epochs"]
    if method in defense_names():
        settings["defense"] = defense_options(method, options)
        settings["undefended"] = get_preset("lora", method_overrides("lora", overrides)[0]).to_dict()
    return settings


def _load_split(path: Optional[Path], max_rows: Optional[int], seed: int, what: str) -> LoadedData:
    if path is None:
        raise NotApplicable(f"the data has no {what} file.")
    try:
        return load_records(path).subsample(max_rows, seed)
    except ValueError as error:
        if "no data rows" in str(error):
            raise NotApplicable(
                f"{what} has no rows ({path}); a trigger-free dataset has no ASR to measure."
            ) from None
        raise


def run_method(
    method: str,
    files: AttackFiles,
    directory: Path,
    *,
    model_dir: Optional[str] = None,
    seed: int = 0,
    overrides: Optional[list[str]] = None,
    target_label: int = 1,
    progress: bool = True,
    extra: Optional[dict[str, Any]] = None,
    undefended: Optional[Callable[[], dict[str, Any]]] = None,
    load_in_4bit: bool = False,
) -> dict[str, Any]:
    """Run one cell of `method` on one attack's files; returns (and writes) its `metrics.json`.

    Args:
        method: A preset, `clean-only`, `oracle` or a defense name (see [`method_names`]).
        files: The attack's files ([`SharedData.attack_files`]).
        directory: The cell's output directory.
        model_dir: Local model directory (default MiniLM-L6).
        seed: Seed of everything (subsamples, trusted split, training, defenses).
        overrides: `--set` items: preset fields and `<defense>.<field>` options.
        target_label: The backdoor's target label.
        progress: Progress bars.
        extra: Fields recorded in `metrics.json` (attack, bench preset).
        undefended: Returns the finished undefended `lora` cell (metrics with `adapter_dir`) that `bki`, `cube` and
            the detectors build on; None trains it into `directory/undefended`.
        load_in_4bit: Load the base model in NF4 4-bit (QLoRA).

    Raises:
        NotApplicable: The data lacks what the method needs (one-line reason).
    """
    from .runner import METRICS_FILE, _write_json, train_cell

    check_method(method, overrides)
    preset_overrides, options = method_overrides(method, overrides)
    directory = Path(directory)
    training = get_preset(method if method in PRESETS else "lora", preset_overrides).training
    test_clean = _load_split(files.test_clean, training.max_test_rows, seed, "clean test set")
    test_poison = _load_split(files.test_poison, training.max_test_rows, seed, "triggered test set")
    common: dict[str, Any] = {
        "model_dir": model_dir,
        "seed": seed,
        "test_clean": test_clean,
        "test_poison": test_poison,
        "target_label": target_label,
        "progress": progress,
        "load_in_4bit": load_in_4bit,
    }
    extra = {**(extra or {}), "method": method}
    no_subsample = ["max_train_rows=none", "max_dev_rows=none", "max_test_rows=none"]

    if method in PRESETS:
        if training.gradient_alignment:  # the same split GA makes, checked here so that a lack of rows reads as n/a
            split_trusted(
                load_records(files.dev).subsample(training.max_dev_rows, seed), training.reference_split_size, seed
            )
        return train_cell(method, files.train, files.dev, directory, overrides=preset_overrides, extra=extra, **common)

    if method == "oracle":
        if files.train_clean is None:
            raise NotApplicable(
                f"attack {files.attack!r} has no train-clean.csv: the oracle needs the unpoisoned training set."
            )
        return train_cell(
            "lora", files.train_clean, files.dev, directory, overrides=preset_overrides, extra=extra, **common
        )

    dev = load_records(files.dev).subsample(training.max_dev_rows, seed)
    if method == "clean-only":
        trusted, rest = split_trusted(dev, training.reference_split_size, seed)
        extra.update({"trusted_rows": len(trusted), "dev_rows_for_selection": len(rest)})
        return train_cell(
            "lora",
            trusted,
            rest,
            directory,
            overrides=[*preset_overrides, *no_subsample, f"num_train_epochs={training.clean_only_epochs}"],
            extra=extra,
            **common,
        )

    from .defenses import DEFENSES, ModelScorer
    from .runner import load_cell

    cls, kind = DEFENSES[method]
    opts = {"seed": seed, **defense_options(method, options)}
    directory.mkdir(parents=True, exist_ok=True)
    base: Optional[dict[str, Any]] = None
    if kind == "detector" or method in _FILTER_NEEDS_MODEL:
        if undefended is None:
            base = train_cell(
                "lora",
                files.train,
                files.dev,
                directory / "undefended",
                overrides=method_overrides("lora", overrides)[0],
                **common,
            )
        else:
            base = undefended()
        if base.get("status", "ok") != "ok":
            raise ValueError(f"the undefended lora cell {method} builds on failed: {base.get('error')}")
    base_time = float(base["train_time_s"]) if base else 0.0

    if kind == "filter":
        train = load_records(files.train).subsample(training.max_train_rows, seed)
        start = time.perf_counter()
        if method in _FILTER_NEEDS_MODEL:
            model, tokenizer, info = load_cell(base["adapter_dir"])
            opts["encoder"] = ModelScorer(model, tokenizer, info["max_length"], info["eval_batch_size"])
        result = cls(**opts).fit(train.texts, train.labels)
        defense_time = time.perf_counter() - start
        kept = train.replace(
            [r for r, k in zip(train.records, result.keep_mask) if k], f"{train.source} (kept by {method})"
        )
        if not len(kept):
            raise NotApplicable(f"{method} removed every training row; nothing is left to train on.")
        report = result.report([r.poisoned for r in train.records])
        metrics = train_cell(
            "lora",
            kept,
            dev,
            directory,
            overrides=[*preset_overrides, *no_subsample],
            extra={**extra, "defense": {**report, **result.details}},
            **common,
        )
        retrain = float(metrics["train_time_s"])
        metrics.update(
            {
                "retrain_time_s": retrain,
                "defense_time_s": round(defense_time, 3),
                "undefended_train_time_s": base_time or None,
                "train_time_s": round(base_time + defense_time + retrain, 3),
            }
        )
        _write_json(directory / METRICS_FILE, metrics)
        return metrics

    # detectors on the undefended model
    from .metrics import attack_success_rate, clean_accuracy, false_target_rate
    from .runner import predict, versions

    model, tokenizer, info = load_cell(base["adapter_dir"])
    max_length, batch = info["max_length"], info["eval_batch_size"]
    start = time.perf_counter()
    if method == "strip":
        detector = cls(ModelScorer(model, tokenizer, max_length, batch), **opts)
    elif method == "rap":
        detector = cls(model, tokenizer, target_label=target_label, max_length=max_length, **opts)
    else:
        detector = cls(**opts)
    detector.fit(dev.texts)
    clean_texts, poison_texts = test_clean.texts, test_poison.texts
    if method == "onion":
        clean_texts, clean_det = detector.sanitize_with_scores(clean_texts)
        poison_texts, poison_det = detector.sanitize_with_scores(poison_texts)
    else:
        clean_det, poison_det = detector.detect(clean_texts), detector.detect(poison_texts)
    defense_time = time.perf_counter() - start
    clean_pred = predict(model, tokenizer, clean_texts, batch, max_length, progress)
    poison_pred = predict(model, tokenizer, poison_texts, batch, max_length, progress)
    if method == "onion":
        asr = attack_success_rate(poison_pred, target_label)
        passed = poison_pred
    else:
        passed = [p for p, f in zip(poison_pred, poison_det.flagged_mask) if not f]
        asr = sum(p == target_label for p in passed) / len(poison_pred)
    metrics: dict[str, Any] = {
        "status": "ok",
        "method": method,
        "seed": seed,
        "model_dir": base.get("model_dir"),
        "undefended_adapter_dir": base["adapter_dir"],
        "cacc": clean_accuracy(clean_pred, test_clean.labels),
        "asr": asr,
        "false_target_rate": false_target_rate(clean_pred, test_clean.labels, target_label),
        "clean_rows": len(test_clean),
        "poison_rows": len(test_poison),
        "defense": {
            "frr": clean_det.flagged_rate,
            "triggered_flagged_rate": poison_det.flagged_rate,
            "asr_among_passed": attack_success_rate(passed, target_label) if passed else None,
            "threshold": detector.threshold,
            "dev_rows": len(dev),
            "options": dict(opts),
        },
        "undefended_train_time_s": base_time,
        "defense_time_s": round(defense_time, 3),
        "train_time_s": round(base_time + defense_time, 3),
        "overrides": list(overrides or []),
        "data": {"dev": dev.summary(), "test_clean": test_clean.summary(), "test_poison": test_poison.summary()},
        "versions": versions(),
        **extra,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return metrics
