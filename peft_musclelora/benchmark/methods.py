"""The registry of bench methods: every preset, the baselines, the training-data filters and the detectors.

`musclelora bench --methods` takes any name in [`METHODS`]; a cell of a method is run by looking the method up and
calling its `run` with a [`CellContext`] (no `if method == ...` chains). Every cell writes the same `metrics.json`
fields (status, CACC, ASR, false-target rate, train time) plus what the method adds:

* presets (`lora`, `musclelora`, ...; [`peft_musclelora.benchmark.presets`]) train on the poisoned training set.
* `clean-only`: undefended LoRA (`lora` preset, `clean_only_epochs` = 20 epochs by default) trained on the trusted
  rows alone: exactly the `reference_split_size` rows gradient alignment would use as references (same seeded
  split, [`split_trusted`]), removed from dev; the checkpoint is chosen on the rest of clean dev.
* `oracle`: `lora` trained on the attack's `train-clean.csv` (the unpoisoned training set, which no defender has);
  its ASR is the floor a backdoor-free model reaches. n/a when the data has no such file.
* `oracle-drop`: `lora` trained on the poisoned training set's rows that are not flagged poisoned (a perfect
  detector that drops what it finds, which no defender has): the clean accuracy a defense that *discards* the
  poisoned rows can reach at best, since the oracle also has their unpoisoned versions. n/a when no row is flagged.
* filters (`zdefence`, `bki`, `cube`): the filter sees the (subsampled) poisoned training set, `lora` is trained on
  the kept rows; `bki`/`cube` first need the undefended `lora` model. Adds rows removed and, from the poison flags,
  poisoned recall and removal precision.
* detectors (`strip`, `rap`, `onion`): on the undefended `lora` model, threshold on clean dev at a fixed FRR; ASR
  counts the triggered test rows that pass the detector *and* are predicted as the target; FRR is the share of
  clean test rows rejected. ONION instead removes the flagged words and the model predicts on the cleaned texts.

`train_time_s` of a defense is everything it costs end to end: the undefended training it needs, its own work
(scoring, clustering, fitting on dev, screening the test sets) and any retraining; the parts are recorded too.
A method asked for what the data lacks raises [`NotApplicable`]; the bench records `n/a` with the reason.

Adding a method is one function and one [`register`] line (a defense: its file in `defenses/` and one line here).

Example:
    >>> get_method("clean-only").kind, get_method("onion").kind, get_method("musclelora").kind
    ('baseline', 'detector', 'preset')
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .artefacts import METRICS_FILE, write_json
from .builders import load_cell
from .data import AttackFiles, LoadedData, load_records
from .defenses import Bki, Cube, ModelScorer, Onion, Rap, Strip, ZDefence
from .evaluation import predict
from .metrics import attack_success_rate, clean_accuracy, false_target_rate, false_target_rate_by_label
from .presets import PRESETS
from .runner import train_cell, versions
from .settings import MethodPreset, apply_overrides
from .splits import NotApplicable, split_trusted

if TYPE_CHECKING:  # the spec module looks methods up here; only the annotation goes the other way
    from .spec import CellSpec

#: Overrides that train on exactly the rows a method hands over (they are subsampled already).
NO_SUBSAMPLE = {"max_train_rows": None, "max_dev_rows": None, "max_test_rows": None}


@dataclass
class CellContext:
    """Everything one cell of a method runs with: its resolved [`CellSpec`], the attack's files and the run's
    options (`num_labels`: the classes of the attack's data). `undefended` returns the finished undefended `lora`
    cell (metrics with `adapter_dir`) that `bki`, `cube` and the detectors build on; None trains it into
    `directory/undefended`."""

    spec: CellSpec
    files: AttackFiles
    directory: Path
    model_dir: Optional[str] = None
    seed: int = 0
    target_label: int = 1
    num_labels: int = 2
    progress: bool = True
    load_in_4bit: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    undefended: Optional[Callable[[], dict[str, Any]]] = None

    def train(self, overrides: dict[str, Any], train: Any, dev: Any, directory: Path, **more: Any) -> dict[str, Any]:
        """[`train_cell`] of the method's preset with `overrides`, and this cell's model, seed, test sets and
        loading options."""
        return train_cell(
            self.spec.trains,
            train,
            dev,
            directory,
            model_dir=self.model_dir,
            seed=self.seed,
            overrides=overrides,
            test_clean=self.test("clean"),
            test_poison=self.test("poison"),
            target_label=self.target_label,
            num_labels=self.num_labels,
            progress=self.progress,
            load_in_4bit=self.load_in_4bit,
            **more,
        )

    def test(self, which: str) -> LoadedData:
        """The (subsampled) clean or triggered test set; [`NotApplicable`] when the data lacks it."""
        path = self.files.test_clean if which == "clean" else self.files.test_poison
        what = "clean test set" if which == "clean" else "triggered test set"
        return _load_split(path, self.spec.preset.training.max_test_rows, self.seed, what, self.num_labels)

    def check_tests(self) -> None:
        """Read both test sets first: a missing or empty one reads as n/a before anything trains."""
        self.test("clean"), self.test("poison")  # noqa: B018

    def dev(self) -> LoadedData:
        """The (subsampled) clean dev set."""
        return load_records(self.files.dev, self.num_labels).subsample(
            self.spec.preset.training.max_dev_rows, self.seed
        )

    def base_cell(self) -> dict[str, Any]:
        """The finished undefended `lora` cell this defense builds on (trained on demand)."""
        if self.undefended is not None:
            base = self.undefended()
        else:
            overrides = self.spec.undefended_overrides
            base = train_cell(
                "lora",
                self.files.train,
                self.files.dev,
                self.directory / "undefended",
                model_dir=self.model_dir,
                seed=self.seed,
                overrides=self.spec.overrides if overrides is None else overrides,
                test_clean=self.test("clean"),
                test_poison=self.test("poison"),
                target_label=self.target_label,
                num_labels=self.num_labels,
                progress=self.progress,
                load_in_4bit=self.load_in_4bit,
            )
        if base.get("status", "ok") != "ok":
            raise ValueError(f"the undefended lora cell {self.spec.method} builds on failed: {base.get('error')}")
        return base


def _load_split(
    path: Optional[Path], max_rows: Optional[int], seed: int, what: str, num_labels: int = 2
) -> LoadedData:
    if path is None:
        raise NotApplicable(f"the data has no {what} file.")
    try:
        return load_records(path, num_labels).subsample(max_rows, seed)
    except ValueError as error:
        if "no data rows" in str(error):
            raise NotApplicable(
                f"{what} has no rows ({path}); a trigger-free dataset has no ASR to measure."
            ) from None
        raise


@dataclass(frozen=True)
class Method:
    """One bench method.

    Args:
        name: What `--methods` takes.
        kind: `preset`, `baseline`, `filter` or `detector`.
        run: Runs one cell; returns (and writes) its `metrics.json`.
        trains: The preset its training uses (a preset trains itself; the others `lora`).
        options: The dataclass of its `--set <name>.<field>` options (a defense's class), or None.
        needs_undefended: Whether it builds on the undefended `lora` cell.
        identity: The preset as it identifies a cell (`clean-only` trains for `clean_only_epochs`).
    """

    name: str
    kind: str
    run: Callable[[CellContext], dict[str, Any]]
    trains: str = "lora"
    options: Optional[type] = None
    needs_undefended: bool = False
    identity: Callable[[MethodPreset], MethodPreset] = lambda preset: preset


#: Every method, by name, in the order `musclelora bench --help` lists them.
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to [`METHODS`] (a name registered twice is an error)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered already.")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method called `name`; a one-line `ValueError` listing the available ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}.")
    return METHODS[name]


def method_names() -> list[str]:
    """Every method `musclelora bench --methods` accepts."""
    return list(METHODS)


def defense_names() -> list[str]:
    """The classic defenses (filters and detectors)."""
    return [name for name, method in METHODS.items() if method.kind in ("filter", "detector")]


# ---- presets and baselines -----------------------------------------------------------------------------------


def _run_preset(ctx: CellContext) -> dict[str, Any]:
    training = ctx.spec.preset.training
    ctx.check_tests()
    if training.gradient_alignment:  # the same split GA makes, checked here so that a lack of rows reads as n/a
        split_trusted(ctx.dev(), training.reference_split_size, ctx.seed, training.ga.reference_stratify)
    return ctx.train(ctx.spec.overrides, ctx.files.train, ctx.files.dev, ctx.directory, extra=ctx.extra)


def _run_oracle(ctx: CellContext) -> dict[str, Any]:
    ctx.check_tests()
    if ctx.files.train_clean is None:
        raise NotApplicable(
            f"attack {ctx.files.attack!r} has no train-clean.csv: the oracle needs the unpoisoned training set."
        )
    return ctx.train(ctx.spec.overrides, ctx.files.train_clean, ctx.files.dev, ctx.directory, extra=ctx.extra)


def _run_oracle_drop(ctx: CellContext) -> dict[str, Any]:
    ctx.check_tests()
    train = load_records(ctx.files.train, ctx.num_labels).subsample(ctx.spec.preset.training.max_train_rows, ctx.seed)
    if not train.num_poisoned:
        raise NotApplicable(
            f"{train.source} flags no row as poisoned: oracle-drop would train on every row, as lora does."
        )
    kept = train.replace([r for r in train.records if not r.poisoned], f"{train.source} (rows not flagged poisoned)")
    extra = {**ctx.extra, "rows_dropped": len(train) - len(kept)}
    return ctx.train({**ctx.spec.overrides, **NO_SUBSAMPLE}, kept, ctx.dev(), ctx.directory, extra=extra)


def _clean_only_epochs(preset: MethodPreset) -> MethodPreset:
    return apply_overrides(preset, {"num_train_epochs": preset.training.clean_only_epochs})


def _run_clean_only(ctx: CellContext) -> dict[str, Any]:
    ctx.check_tests()
    preset = ctx.spec.preset
    trusted, rest = split_trusted(
        ctx.dev(), preset.training.reference_split_size, ctx.seed, preset.training.ga.reference_stratify
    )
    extra = {**ctx.extra, "trusted_rows": len(trusted), "dev_rows_for_selection": len(rest)}
    overrides = {**ctx.spec.overrides, **NO_SUBSAMPLE, "num_train_epochs": preset.training.clean_only_epochs}
    return ctx.train(overrides, trusted, rest, ctx.directory, extra=extra)


for _name in PRESETS:
    register(Method(_name, "preset", _run_preset, trains=_name))
register(Method("clean-only", "baseline", _run_clean_only, identity=_clean_only_epochs))
register(Method("oracle", "baseline", _run_oracle))
register(Method("oracle-drop", "baseline", _run_oracle_drop))


# ---- filters: a defense picks the training rows, lora trains on them -----------------------------------------


@dataclass(frozen=True)
class UndefendedModel:
    """The undefended `lora` model a defense works on, as the defense constructors need it."""

    model: Any
    tokenizer: Any
    max_length: int
    batch_size: int
    target_label: int

    @classmethod
    def load(cls, base: dict[str, Any], target_label: int) -> UndefendedModel:
        model, tokenizer, info = load_cell(base["adapter_dir"])
        return cls(model, tokenizer, info["max_length"], info["eval_batch_size"], target_label)

    def scorer(self) -> ModelScorer:
        """The model as class probabilities and representations."""
        return ModelScorer(self.model, self.tokenizer, self.max_length, self.batch_size)


def filter_method(name: str, cls: type, needs_model: bool = False) -> Method:
    """A training-data filter `cls` (`fit(texts, labels) -> FilterResult`); with `needs_model` it gets the undefended
    model as `encoder=`."""

    def run(ctx: CellContext) -> dict[str, Any]:
        ctx.check_tests()
        preset, seed = ctx.spec.preset, ctx.seed
        dev = ctx.dev()
        opts: dict[str, Any] = {"seed": seed, **ctx.spec.defense}
        ctx.directory.mkdir(parents=True, exist_ok=True)
        base = ctx.base_cell() if needs_model else None
        base_time = float(base["train_time_s"]) if base else 0.0
        train = load_records(ctx.files.train, ctx.num_labels).subsample(preset.training.max_train_rows, seed)
        start = time.perf_counter()
        if base is not None:
            opts["encoder"] = UndefendedModel.load(base, ctx.target_label).scorer()
        result = cls(**opts).fit(train.texts, train.labels)
        defense_time = time.perf_counter() - start
        kept = train.replace(
            [r for r, k in zip(train.records, result.keep_mask) if k], f"{train.source} (kept by {name})"
        )
        if not len(kept):
            raise NotApplicable(f"{name} removed every training row; nothing is left to train on.")
        report = result.report([r.poisoned for r in train.records])
        extra = {**ctx.extra, "defense": {**report, **result.details}}
        metrics = ctx.train({**ctx.spec.overrides, **NO_SUBSAMPLE}, kept, dev, ctx.directory, extra=extra)
        retrain = float(metrics["train_time_s"])
        metrics.update(
            {
                "retrain_time_s": retrain,
                "defense_time_s": round(defense_time, 3),
                "undefended_train_time_s": base_time or None,
                "train_time_s": round(base_time + defense_time + retrain, 3),
            }
        )
        write_json(ctx.directory / METRICS_FILE, metrics)
        return metrics

    return Method(name, "filter", run, options=cls, needs_undefended=needs_model)


# ---- detectors: a defense screens the undefended model's inputs ----------------------------------------------


def detector_method(
    name: str, cls: type, build: Callable[[UndefendedModel, dict[str, Any]], Any], sanitizes: bool = False
) -> Method:
    """An inference-time detector built by `build(model, options)` (`fit(clean_texts)`, `detect(texts)`); with
    `sanitizes` it cleans the inputs instead (`sanitize_with_scores`) and the model predicts on the cleaned texts."""

    def run(ctx: CellContext) -> dict[str, Any]:
        test_clean, test_poison = ctx.test("clean"), ctx.test("poison")
        dev = ctx.dev()
        opts: dict[str, Any] = {"seed": ctx.seed, **ctx.spec.defense}
        ctx.directory.mkdir(parents=True, exist_ok=True)
        base = ctx.base_cell()
        base_time = float(base["train_time_s"])
        undefended = UndefendedModel.load(base, ctx.target_label)
        start = time.perf_counter()
        detector = build(undefended, opts)
        detector.fit(dev.texts)
        clean_texts, poison_texts = test_clean.texts, test_poison.texts
        if sanitizes:
            clean_texts, clean_det = detector.sanitize_with_scores(clean_texts)
            poison_texts, poison_det = detector.sanitize_with_scores(poison_texts)
        else:
            clean_det, poison_det = detector.detect(clean_texts), detector.detect(poison_texts)
        defense_time = time.perf_counter() - start
        model, tokenizer = undefended.model, undefended.tokenizer
        batch, max_length, target = undefended.batch_size, undefended.max_length, ctx.target_label
        clean_pred = predict(model, tokenizer, clean_texts, batch, max_length, ctx.progress)
        poison_pred = predict(model, tokenizer, poison_texts, batch, max_length, ctx.progress)
        if sanitizes:
            asr = attack_success_rate(poison_pred, target)
            passed = poison_pred
        else:
            passed = [p for p, f in zip(poison_pred, poison_det.flagged_mask) if not f]
            asr = sum(p == target for p in passed) / len(poison_pred)
        metrics: dict[str, Any] = {
            "status": "ok",
            "method": name,
            "seed": ctx.seed,
            "model_dir": base.get("model_dir"),
            "undefended_adapter_dir": base["adapter_dir"],
            "cacc": clean_accuracy(clean_pred, test_clean.labels),
            "asr": asr,
            "false_target_rate": false_target_rate(clean_pred, test_clean.labels, target),
            "false_target_rate_by_label": false_target_rate_by_label(clean_pred, test_clean.labels, target),
            "clean_rows": len(test_clean),
            "poison_rows": len(test_poison),
            "defense": {
                "frr": clean_det.flagged_rate,
                "triggered_flagged_rate": poison_det.flagged_rate,
                "asr_among_passed": attack_success_rate(passed, target) if passed else None,
                "threshold": detector.threshold,
                "dev_rows": len(dev),
                "options": dict(opts),
            },
            "undefended_train_time_s": base_time,
            "defense_time_s": round(defense_time, 3),
            "train_time_s": round(base_time + defense_time, 3),
            "overrides": dict(ctx.spec.overrides),
            "data": {"dev": dev.summary(), "test_clean": test_clean.summary(), "test_poison": test_poison.summary()},
            "versions": versions(),
            **ctx.extra,
        }
        write_json(ctx.directory / METRICS_FILE, metrics)
        return metrics

    return Method(name, "detector", run, options=cls, needs_undefended=True)


register(filter_method("zdefence", ZDefence))
register(filter_method("bki", Bki, needs_model=True))
register(filter_method("cube", Cube, needs_model=True))
register(detector_method("strip", Strip, lambda m, opts: Strip(m.scorer(), **opts)))
register(
    detector_method(
        "rap",
        Rap,
        lambda m, opts: Rap(m.model, m.tokenizer, target_label=m.target_label, max_length=m.max_length, **opts),
    )
)
register(detector_method("onion", Onion, lambda m, opts: Onion(**opts), sanitizes=True))
