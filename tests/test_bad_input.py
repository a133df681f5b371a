"""Bad input, one table: every case is refused with the right exception or exit code and a message that names the
field or file and the value.

Each row of `CASES` is (id, what runs, what is expected, what the message must say). What runs is either Python code
that must raise (or warn), or a `musclelora` command line, run in-process through `main(argv)`; a command must exit
with the given code and print one `musclelora ...` line, no traceback. Some rows also check afterwards that nothing was
lost (a finished cell is left as it was). Models and data are tiny and built here (the benchmark's tiny BERT), so the
whole table takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import pytest
import torch

from peft_musclelora import MuScleLoraConfig, MuScleLoraTrainingArguments, check_adapter_dir, load_adapter_safely
from peft_musclelora.benchmark.cli import main
from peft_musclelora.benchmark.commands import bench as bench_command
from peft_musclelora.benchmark.data import load_dataset_records, load_records, load_splits
from peft_musclelora.benchmark.presets import QUICK_OVERRIDES, get_preset

from .benchmark.conftest import attack_dir, tiny_bert  # noqa: F401  (fixtures)

ATTACK = "badnets"


@dataclass
class Env:
    """What a case works with: the tiny model, the attack's files, a finished cell (a private copy) and a temp dir."""

    model: Path
    data: Path
    files: Path
    cell: Path
    tmp: Path

    def csv(self, name: str, text: Union[str, bytes]) -> Path:
        """Write a data file into the temp dir."""
        path = self.tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path

    def train_argv(self, *extra: str, output: Union[Path, None] = None) -> list[str]:
        f = self.files
        argv = [
            "train",
            "--method",
            "lora",
            "--train",
            str(f / "train-mixed-0.1.csv"),
            "--dev",
            str(f / "dev-clean.csv"),
        ]
        argv += ["--model", str(self.model), "--output-dir", str(output or self.tmp / "out"), "--quiet"]
        return argv + ["--set", "num_train_epochs=1", *extra]

    def eval_argv(self, adapter: Path, *extra: str, clean: Union[Path, None] = None) -> list[str]:
        clean = clean or self.files / "test-clean.csv"
        argv = ["eval", "--adapter", str(adapter), "--clean", str(clean)]
        return argv + ["--poison", str(self.files / "test-poison.csv"), "--quiet", *extra]

    def bench_argv(self, *extra: str) -> list[str]:
        argv = [
            "bench",
            "--attacks",
            ATTACK,
            "--methods",
            "lora",
            "--data",
            str(self.data),
            "--model",
            str(self.model),
        ]
        return argv + ["--preset", "quick", "--output-dir", str(self.tmp / "bench"), "--quiet", *extra]

    def adapter_copy(self) -> Path:
        """A private copy of the finished cell's adapter directory, to damage."""
        target = self.tmp / "adapter"
        shutil.copytree(self.cell / "adapter", target)
        return target


@dataclass(frozen=True)
class Case:
    """One bad input.

    Args:
        id: Test id.
        run: Python code that must raise/warn, or returns the `musclelora` argv to run.
        expect: The exception or warning class, or the exit code of the command.
        says: Substrings the message must contain (the field or file, and the value).
        cli: Whether `run` returns an argv.
        after: A check run afterwards (e.g. the finished cell is unchanged).
    """

    id: str
    run: Callable[[Env], Any]
    expect: Union[type[BaseException], int]
    says: tuple[str, ...]
    cli: bool = False
    after: Union[Callable[[Env], None], None] = field(default=None)


def _config(**kwargs: Any) -> Callable[[Env], Any]:
    return lambda env: MuScleLoraConfig(target_modules=["query"], **kwargs)


def _cli(build: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
    return build


OPENBACKDOOR = ",0,1,2\n"


def _load(name: str, text: Union[str, bytes], **kwargs: Any) -> Callable[[Env], Any]:
    return lambda env: load_records(env.csv(name, text), **kwargs)


def _damaged(damage: Callable[[Path], None]) -> Callable[[Env], list[str]]:
    """An `eval` of a copy of the finished cell's adapter after `damage(adapter_dir)`."""

    def build(env: Env) -> list[str]:
        adapter = env.adapter_copy()
        damage(adapter)
        return env.eval_argv(adapter)

    return build


def _replace_weights_by_pickle(adapter: Path) -> None:
    weights = adapter / "adapter_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), adapter / "adapter_model.bin")
    weights.unlink()


class _Exploit:
    """A pickle whose loading would create a marker file: it must never be unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _malicious_pickle(adapter: Path) -> None:
    import pickle

    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Exploit(adapter.parent / "PWNED")))


def _nothing_unpickled(env: Env) -> None:
    assert not (env.tmp / "PWNED").exists()


def _write_weights(adapter: Path, value: float) -> None:
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(path))


def _set_config(adapter: Path, text: str) -> None:
    (adapter / "adapter_config.json").write_text(text)


def _peft_type(adapter: Path, value: str) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = value
    _set_config(adapter, json.dumps(config))


def _truncate(adapter: Path) -> None:
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])


def _base_model(env: Env) -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(env.model), num_labels=2)


def _python_load(damage: Callable[[Path], None]) -> Callable[[Env], Any]:
    def run(env: Env) -> Any:
        adapter = env.adapter_copy()
        damage(adapter)
        return load_adapter_safely(_base_model(env), adapter)

    return run


def _check(damage: Callable[[Path], None]) -> Callable[[Env], Any]:
    def run(env: Env) -> Any:
        adapter = env.adapter_copy()
        damage(adapter)
        return check_adapter_dir(adapter)

    return run


def _tiny_trainer(env: Env, labels: list[int], **args: Any) -> Any:
    import datasets
    from transformers import BertConfig, BertForSequenceClassification

    from peft_musclelora import MuScleLoraTrainer

    model = BertForSequenceClassification(
        BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    )
    rows = {"input_ids": [[2, 3, 4]] * len(labels), "attention_mask": [[1, 1, 1]] * len(labels), "labels": labels}
    dataset = datasets.Dataset.from_dict(rows)
    training = MuScleLoraTrainingArguments(output_dir=str(env.tmp / "trainer"), report_to="none", use_cpu=True, **args)
    reference = dataset if args.get("gradient_alignment") and not args.get("reference_split_size") else None
    return MuScleLoraTrainer(
        model=model, args=training, train_dataset=dataset, eval_dataset=dataset, reference_dataset=reference
    )


def _assert_eval_kept(trainer: Any) -> None:
    assert len(trainer.eval_dataset) == 4 and trainer.reference_dataset is None


def _finished_cell_with(overrides: list[str]) -> Callable[[Env], list[str]]:
    """A bench into a directory holding a finished `lora` cell trained with other `--set` items."""

    def build(env: Env) -> list[str]:
        cell = env.tmp / "bench" / "cells" / ATTACK / "lora" / "seed0"
        cell.mkdir(parents=True)
        quick = [f"{k}={v}" for k, v in QUICK_OVERRIDES.items()]
        metrics = {"status": "ok", "method": "lora", "seed": 0, "bench_preset": "quick", "model_dir": str(env.model)}
        metrics.update({"load_in_4bit": False, "bench_overrides": quick + overrides, "cacc": 0.9, "asr": 0.1})
        (cell / "metrics.json").write_text(json.dumps(metrics))
        return env.bench_argv()

    return build


def _bench_cell_kept(env: Env) -> None:
    metrics = json.loads((env.tmp / "bench" / "cells" / ATTACK / "lora" / "seed0" / "metrics.json").read_text())
    assert metrics["cacc"] == 0.9 and metrics["bench_overrides"][-1] == "r=4"


def _over_finished_cell(env: Env) -> list[str]:
    """`train` into a copy of a finished cell with a test file that turns out to be bad."""
    target = env.tmp / "cell"
    shutil.copytree(env.cell, target)
    bad = env.csv("bad-test.csv", OPENBACKDOOR + "0,good film,7,0\n")
    return env.train_argv("--test-clean", str(bad), "--test-poison", str(env.files / "test-poison.csv"), output=target)


def _finished_cell_untouched(env: Env) -> None:
    target = env.tmp / "cell"
    assert (target / "metrics.json").read_bytes() == (env.cell / "metrics.json").read_bytes()
    original = (env.cell / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (target / "adapter" / "adapter_model.safetensors").read_bytes() == original
    assert (target / "log_history.json").read_bytes() == (env.cell / "log_history.json").read_bytes()
    assert not [p for p in target.iterdir() if p.name.startswith(".partial-")]


def _interrupted_train(env: Env) -> list[str]:
    """`train` over a finished cell, interrupted (Ctrl-C) during training."""
    import transformers

    def interrupt(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    env.monkeypatch.setattr(transformers.Trainer, "train", interrupt)  # type: ignore[attr-defined]
    target = env.tmp / "cell"
    shutil.copytree(env.cell, target)
    return env.train_argv(output=target)


def _interrupted_bench(env: Env) -> list[str]:
    """A bench of two seeds whose second cell is interrupted (Ctrl-C) after the first finished."""

    def run_cell(run: Any, attack: str, method: str, seed: int, trusted: Any = None) -> dict[str, Any]:
        if seed == 1:
            raise KeyboardInterrupt
        return {"status": "ok", "attack": attack, "method": method, "seed": seed, "reused": False}

    env.monkeypatch.setattr(bench_command, "run_cell", run_cell)
    return env.bench_argv("--seeds", "0,1")


def _existing_output(env: Env) -> list[str]:
    output = env.csv("metrics-kept.json", '{"kept": true}')
    return env.eval_argv(env.cell / "adapter", "--output", str(output))


def _output_kept(env: Env) -> None:
    assert json.loads((env.tmp / "metrics-kept.json").read_text()) == {"kept": True}


def _read_only_dir(env: Env) -> list[str]:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories; the case below covers an unwritable path")
    locked = env.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return env.train_argv(output=locked)


def _poison_argv(env: Env, *extra: str, output: Union[Path, None] = None) -> list[str]:
    """`poison` of the attack's clean files into a fresh folder (or `output`)."""
    f = env.files
    argv = ["poison", "--train", str(f / "train-clean.csv"), "--dev", str(f / "dev-clean.csv")]
    argv += ["--test", str(f / "test-clean.csv"), "--output-dir", str(output or env.tmp / "poisoned")]
    return argv + list(extra)


def _poison_over_existing(env: Env) -> list[str]:
    taken = env.tmp / "taken"
    taken.mkdir()
    (taken / "train-mixed-0.1.csv").write_text(OPENBACKDOOR + GOOD_ROW)
    return _poison_argv(env, output=taken)


def _poison_kept(env: Env) -> None:
    assert (env.tmp / "taken" / "train-mixed-0.1.csv").read_text() == OPENBACKDOOR + GOOD_ROW
    assert not (env.tmp / "taken" / "train-clean.csv").exists()


def _splits(train: str, dev: str, **kwargs: Any) -> Callable[[Env], Any]:
    """`load_splits` of a training file and a dev file with named columns `text,label`."""
    return lambda env: load_splits(env.csv("train.csv", train), {"dev": env.csv("dev.csv", dev)}, **kwargs)


HUGE = "x" * 200_000  # over csv's default field limit of 131072 characters
GOOD_ROW = "0,good film,1,0\n"

CASES = [
    # ---- MuScleLoraConfig ----
    Case("config-lora_alpha-0", _config(lora_alpha=0), ValueError, ("`lora_alpha`", "got 0")),
    Case("config-lora_alpha-negative", _config(lora_alpha=-4), ValueError, ("`lora_alpha`", "got -4")),
    Case("config-lora_alpha-nan", _config(lora_alpha=float("nan")), TypeError, ("`lora_alpha`", "nan")),
    Case("config-alpha_pattern-0", _config(alpha_pattern={"query": 0}), ValueError, ("alpha_pattern['query']", "0")),
    Case("config-r-0", _config(r=0), ValueError, ("`r`", "got 0")),
    Case("config-r-float", _config(r=1.5), TypeError, ("`r`", "1.5")),
    Case("config-rank_pattern-0", _config(rank_pattern={"query": 0}), ValueError, ("rank_pattern['query']", "0")),
    Case("config-lora_dropout-1", _config(lora_dropout=1.0), ValueError, ("`lora_dropout`", "1.0")),
    Case("config-scales-empty", _config(scales=[]), ValueError, ("`scales`", "empty")),
    Case("config-scales-zero", _config(scales=[1, 0]), ValueError, ("`scales`", "0")),
    Case("config-scales-string", _config(scales="1,2"), TypeError, ("`scales`", "'1,2'")),
    Case("config-init_weights", _config(init_weights="gaussian"), ValueError, ("`init_weights`", "'gaussian'")),
    Case("config-bias", _config(bias="some"), ValueError, ("`bias`", "'some'")),
    Case("config-layers_pattern", _config(layers_pattern="layer"), ValueError, ("`layers_pattern`", "'layer'")),
    # ---- training arguments (Python) ----
    Case(
        "args-ga_every_n_steps-0",
        lambda env: MuScleLoraTrainingArguments(output_dir=str(env.tmp), ga_every_n_steps=0),
        ValueError,
        ("`ga_every_n_steps`", "got 0"),
    ),
    Case(
        "args-max_raw_grad_ratio",
        lambda env: MuScleLoraTrainingArguments(output_dir=str(env.tmp), max_raw_grad_ratio=1.5),
        ValueError,
        ("max_raw_grad_ratio", "1.5"),
    ),
    Case(
        "args-reference_split_size-0",
        lambda env: MuScleLoraTrainingArguments(output_dir=str(env.tmp), reference_split_size=0),
        ValueError,
        ("reference_split_size", "0"),
    ),
    Case(
        "args-reference-label-out-of-range",
        lambda env: _tiny_trainer(env, [0, 1, 0, 5], gradient_alignment=True),
        ValueError,
        ("reference_dataset row 3", "'labels' = 5", "num_labels=2"),
    ),
    Case(
        "args-reference_stratify-not-bool",
        lambda env: MuScleLoraTrainingArguments(output_dir=str(env.tmp), reference_stratify="yes"),
        TypeError,
        ("reference_stratify", "'yes'"),
    ),
    Case(
        "args-reference_stratify-with-reference-dataset",
        lambda env: _tiny_trainer(env, [0, 1, 0, 1], gradient_alignment=True, reference_stratify=True),
        ValueError,
        ("reference_stratify=True", "reference_dataset="),
    ),
    Case(
        "args-reference_stratify-token-labels",
        lambda env: _tiny_trainer(
            env,
            [[0, 1], [1, 0], [0, 0], [1, 1]],
            gradient_alignment=True,
            reference_split_size=2,
            reference_stratify=True,
        ),
        ValueError,
        ("reference_stratify=True", "eval_dataset row 0", "labels"),
    ),
    Case(
        "args-reference_split_size-without-ga-warns",
        lambda env: _tiny_trainer(env, [0, 1, 0, 1], gradient_alignment=False, reference_split_size=2),
        UserWarning,
        ("`reference_split_size=2` is ignored", "eval_dataset"),
    ),
    Case(
        "args-reference_split_size-without-ga-keeps-eval",
        lambda env: _assert_eval_kept(
            _tiny_trainer(env, [0, 1, 0, 1], gradient_alignment=False, reference_split_size=2)
        ),
        UserWarning,
        ("reference_split_size", "2"),
    ),
    # ---- method presets and --set ----
    Case("preset-lora_alpha-0", lambda env: get_preset("lora", {"lora_alpha": 0}), ValueError, ("lora_alpha", "0")),
    Case(
        "preset-head_alpha-neg", lambda env: get_preset("mslr", {"head_alpha": -1}), ValueError, ("head_alpha", "-1")
    ),
    Case("set-lora_alpha-0", lambda env: ["presets", "lora", "--set", "lora_alpha=0"], 1, ("lora_alpha", "0"), True),
    Case("set-r-0", lambda env: ["presets", "lora", "--set", "r=0"], 1, ("r must be >= 1", "0"), True),
    Case("set-float", lambda env: ["presets", "--set", "learning_rate=fast"], 1, ("learning_rate", "'fast'"), True),
    Case(
        "set-unknown-key",
        lambda env: ["presets", "--set", "lerning_rate=1"],
        1,
        ("'lerning_rate'", "learning_rate"),
        True,
    ),
    Case("set-no-equals", lambda env: ["presets", "--set", "r"], 1, ("key=value", "'r'"), True),
    Case(
        "set-bool",
        lambda env: ["presets", "--set", "gradient_alignment=maybe"],
        1,
        ("gradient_alignment", "'maybe'"),
        True,
    ),
    Case("set-dropout", lambda env: ["presets", "--set", "lora_dropout=1.5"], 1, ("lora_dropout", "1.5"), True),
    Case(
        "set-max_train_rows-0", lambda env: ["presets", "--set", "max_train_rows=0"], 1, ("max_train_rows", "0"), True
    ),
    Case(
        "set-ga_fallback",
        lambda env: ["presets", "--set", "ga_fallback=sometimes"],
        1,
        ("ga_fallback", "'sometimes'"),
        True,
    ),
    # ---- data files ----
    Case("data-missing-file", lambda env: load_records(env.tmp / "nope.csv"), ValueError, ("nope.csv", "no such")),
    Case("data-empty-file", _load("empty.csv", ""), ValueError, ("empty.csv", "empty")),
    Case("data-header-only", _load("header.csv", OPENBACKDOOR), ValueError, ("header.csv", "no data rows")),
    Case("data-no-label-column", _load("nolabel.csv", "text\nfine\n"), ValueError, ("nolabel.csv", "'label'")),
    Case("data-no-text-column", _load("notext.tsv", "label\n1\n"), ValueError, ("notext.tsv", "text column")),
    Case(
        "data-label-not-int", _load("lab.csv", OPENBACKDOOR + "0,ok,yes,0\n"), ValueError, ("lab.csv line 2", "'yes'")
    ),
    Case("data-label-range", _load("range.csv", OPENBACKDOOR + "0,ok,5,0\n"), ValueError, ("range.csv line 2", "= 5")),
    Case("data-flag", _load("flag.csv", OPENBACKDOOR + "0,ok,1,x\n"), ValueError, ("flag.csv line 2", "'x'")),
    Case("data-too-few-fields", _load("few.csv", OPENBACKDOOR + "0,ok\n"), ValueError, ("few.csv line 2", "got 2")),
    Case(
        "data-huge-field",
        _load("huge.csv", OPENBACKDOOR + GOOD_ROW + f"1,{HUGE},1,0\n"),
        ValueError,
        ("huge.csv line 3", "field limit of 131072"),
    ),
    Case(
        "data-not-utf8",
        _load("latin1.csv", (OPENBACKDOOR + GOOD_ROW).encode() + b"1,caf\xe9,1,0\n"),
        ValueError,
        ("latin1.csv line 3", "0xe9", "UTF-8"),
    ),
    Case("data-nul-byte", _load("nul.csv", OPENBACKDOOR + "0,go\x00od,1,0\n"), ValueError, ("nul.csv line 2", "NUL")),
    Case("data-num_labels", _load("n.csv", OPENBACKDOOR + GOOD_ROW, num_labels=1), ValueError, ("num_labels", "1")),
    Case(
        "dataset-nul-byte",
        lambda env: load_dataset_records([{"text": "a\x00b", "label": 0}], name="rows"),
        ValueError,
        ("rows row 0", "NUL"),
    ),
    Case(
        "dataset-text-not-string",
        lambda env: load_dataset_records([{"text": 3, "label": 0}], name="rows"),
        ValueError,
        ("rows row 0", "'text'", "3"),
    ),
    # ---- tasks, labels and poisoning ----
    Case(
        "labels-unseen-value",
        _splits("text,label\na,neg\nb,pos\n", "text,label\nc,pos\nd,neutral\n"),
        ValueError,
        ("dev.csv line 3", "'neutral'", "never has"),
    ),
    Case(
        "labels-dev-beyond-training",
        _splits("text,label\na,0\nb,1\n", "text,label\nc,1\nd,3\n"),
        ValueError,
        ("dev.csv line 3", "= 3 is out of range", "0..1"),
    ),
    Case(
        "labels-not-int-without-mapping",
        _splits("text,label\na,0\nb,1\n", "text,label\nc,yes\n"),
        ValueError,
        ("dev.csv line 2", "must be an integer label", "'yes'"),
    ),
    Case(
        "labels-mixed-without-mapping",
        _splits("text,label\na,0\nb,pos\n", "text,label\nc,0\n"),
        ValueError,
        ("train.csv line 3", "'pos'", "no label mapping", "--label-names"),
    ),
    Case(
        "labels-num-labels-smaller",
        _splits("text,label\na,0\nb,1\nc,2\n", "text,label\nc,0\n", num_labels=2),
        ValueError,
        ("--num-labels 2", "3 labels found", "train.csv"),
    ),
    Case("cli-unknown-task", lambda env: env.bench_argv("--task", "nope"), 1, ("task 'nope'", "['sst-2']"), True),
    Case(
        "cli-target-label-outside",
        lambda env: env.bench_argv("--target-label", "2"),
        1,
        ("target label 2", "outside the labels 0..1"),
        True,
    ),
    Case(
        "cli-train-num-labels-smaller",
        lambda env: [
            *env.train_argv("--num-labels", "2"),
            "--train",
            str(env.csv("k3.csv", OPENBACKDOOR + "0,a,0,0\n1,b,1,0\n2,c,2,0\n")),
        ],
        1,
        ("--num-labels 2", "3 labels found", "k3.csv"),
        True,
    ),
    Case("cli-num-labels-1", lambda env: env.bench_argv("--num-labels", "1"), 2, ("--num-labels", "1"), True),
    Case("cli-poison-rate-1", lambda env: _poison_argv(env, "--poison-rate", "1"), 2, ("--poison-rate", "1.0"), True),
    Case("cli-poison-rate-0", lambda env: _poison_argv(env, "--poison-rate", "0"), 2, ("--poison-rate", "0.0"), True),
    Case(
        "cli-poison-no-row",
        lambda env: _poison_argv(env, "--poison-rate", "0.01"),
        1,
        ("train-clean.csv", "rate 0.01 of 40 rows poisons no row"),
        True,
    ),
    Case(
        "cli-poison-target-outside",
        lambda env: _poison_argv(env, "--target-label", "3"),
        1,
        ("target label 3", "0..1"),
        True,
    ),
    Case(
        "cli-poison-existing-folder",
        _poison_over_existing,
        1,
        ("--output-dir", "taken", "--overwrite"),
        True,
        _poison_kept,
    ),
    Case(
        "cli-poison-sentence-for-badnets",
        lambda env: _poison_argv(env, "--sentence", "hello there"),
        1,
        ("--sentence", "BadNets"),
        True,
    ),
    # ---- command-line flags ----
    Case("cli-seeds-negative", lambda env: env.bench_argv("--seeds", "-1"), 2, ("--seeds", "-1"), True),
    Case("cli-seeds-too-large", lambda env: env.bench_argv("--seeds", str(2**32)), 2, ("--seeds", "4294967296"), True),
    Case("cli-seeds-not-int", lambda env: env.bench_argv("--seeds", "a,b"), 2, ("--seeds", "'a,b'"), True),
    Case("cli-seed-negative", lambda env: env.train_argv("--seed", "-5"), 2, ("--seed", "-5"), True),
    Case("cli-unknown-method", lambda env: env.bench_argv("--methods", "lorra"), 1, ("'lorra'", "lora"), True),
    Case("cli-unknown-attack", lambda env: env.bench_argv("--attacks", "nope"), 1, ("['nope']", "badnets"), True),
    Case("cli-data-missing", lambda env: env.bench_argv("--data", str(env.tmp / "nodata")), 1, ("nodata",), True),
    Case(
        "cli-model-not-a-local-directory",
        lambda env: env.train_argv("--model", "someone/some-model"),
        1,
        ("model 'someone/some-model'", "no such local directory", "never downloaded"),
        True,
    ),
    Case(
        "cli-train-files-and-attack",
        lambda env: env.train_argv("--data", str(env.data), "--attack", ATTACK),
        1,
        ("--attack 'badnets'", "--train", "--dev"),
        True,
    ),
    Case(
        "cli-train-no-files",
        lambda env: ["train", "--method", "lora", "--model", str(env.model), "--quiet"],
        1,
        ("--train and --dev required", "--attack NAME"),
        True,
    ),
    Case(
        "cli-train-unknown-attack",
        lambda env: ["train", "--method", "lora", "--data", str(env.data), "--attack", "nope", "--quiet"],
        1,
        ("attack 'nope' not found", "badnets"),
        True,
    ),
    Case(
        "cli-eval-unknown-task",
        lambda env: (
            ["eval", "--adapter", str(env.cell / "adapter"), "--data", str(env.data), "--task", "x"]
            + ["--attack", ATTACK]
        ),
        1,
        ("task 'x' not found", "sst-2"),
        True,
    ),
    Case(
        "cli-curve-sizes-0", lambda env: ["curve", *env.bench_argv()[5:], "--sizes", "0"], 1, ("--sizes", "[0]"), True
    ),
    Case(
        "cli-output-dir-is-a-file",
        lambda env: env.train_argv(output=env.csv("taken.txt", "x")),
        1,
        ("--output-dir", "taken.txt", "not a directory"),
        True,
    ),
    Case(
        "cli-output-dir-under-a-file",
        lambda env: env.train_argv(output=env.csv("file.txt", "x") / "sub"),
        1,
        ("--output-dir", "file.txt/sub", "cannot write"),
        True,
    ),
    Case("cli-output-dir-read-only", _read_only_dir, 1, ("--output-dir", "locked", "cannot write"), True),
    Case(
        "cli-bench-output-dir-is-a-file",
        lambda env: [*env.bench_argv(), "--output-dir", str(env.csv("bench.txt", "x"))],
        1,
        ("--output-dir", "bench.txt", "not a directory"),
        True,
    ),
    Case(
        "cli-test-clean-without-poison",
        lambda env: env.train_argv("--test-clean", str(env.files / "test-clean.csv")),
        1,
        ("test_clean", "test_poison"),
        True,
    ),
    Case(
        "cli-train-huge-field",
        lambda env: [*env.train_argv(), "--train", str(env.csv("big.csv", OPENBACKDOOR + f"0,{HUGE},1,0\n"))],
        1,
        ("big.csv line 2", "field limit"),
        True,
    ),
    Case(
        "cli-eval-huge-field",
        lambda env: env.eval_argv(env.cell / "adapter", clean=env.csv("big.csv", OPENBACKDOOR + f"0,{HUGE},1,0\n")),
        1,
        ("big.csv line 2", "field limit"),
        True,
    ),
    Case(
        "cli-eval-not-utf8",
        lambda env: env.eval_argv(
            env.cell / "adapter", clean=env.csv("bytes.csv", OPENBACKDOOR.encode() + b"0,\xff,1,0\n")
        ),
        1,
        ("bytes.csv line 2", "0xff"),
        True,
    ),
    Case(
        "cli-train-bad-test-file-keeps-finished-cell",
        _over_finished_cell,
        1,
        ("bad-test.csv line 2", "= 7"),
        True,
        _finished_cell_untouched,
    ),
    Case(
        "cli-eval-output-exists",
        _existing_output,
        1,
        ("--output", "metrics-kept.json", "--overwrite"),
        True,
        _output_kept,
    ),
    Case(
        "cli-eval-output-is-a-dir",
        lambda env: env.eval_argv(env.cell / "adapter", "--output", str(env.tmp)),
        1,
        ("--output", "is a directory"),
        True,
    ),
    Case(
        "cli-bench-other-settings-keeps-finished-cell",
        _finished_cell_with(["r=4"]),
        1,
        ("seed0", "preset.adapter.r: 4 -> 8", "--overwrite"),
        True,
        _bench_cell_kept,
    ),
    # ---- adapter directories ----
    Case("adapter-pickle", _damaged(_replace_weights_by_pickle), 1, ("adapter_model.bin", "pickled"), True),
    Case(
        "adapter-malicious-pickle",
        _damaged(_malicious_pickle),
        1,
        ("adapter_model.bin", "refusing"),
        True,
        _nothing_unpickled,
    ),
    Case(
        "adapter-pt-beside", _damaged(lambda a: (a / "extra.pt").write_bytes(b"x")), 1, ("extra.pt", "pickled"), True
    ),
    Case("adapter-pth-beside", _damaged(lambda a: (a / "w.pth").write_bytes(b"x")), 1, ("w.pth", "pickled"), True),
    Case("adapter-truncated", _damaged(_truncate), 1, ("adapter_model.safetensors", "not a valid safetensors"), True),
    Case(
        "adapter-empty",
        _damaged(lambda a: (a / "adapter_model.safetensors").write_bytes(b"")),
        1,
        ("adapter_model.safetensors", "empty"),
        True,
    ),
    Case(
        "adapter-garbage",
        _damaged(lambda a: (a / "adapter_model.safetensors").write_bytes(b"garbage" * 20)),
        1,
        ("adapter_model.safetensors", "not a valid safetensors"),
        True,
    ),
    Case(
        "adapter-missing-weights",
        _damaged(lambda a: (a / "adapter_model.safetensors").unlink()),
        1,
        ("adapter_model.safetensors", "missing"),
        True,
    ),
    Case(
        "adapter-unknown-peft_type",
        _damaged(lambda a: _peft_type(a, "SUPERLORA")),
        1,
        ("adapter_config.json", "'peft_type'", "'SUPERLORA'"),
        True,
    ),
    Case(
        "adapter-config-not-json",
        _damaged(lambda a: _set_config(a, "{r: 8")),
        1,
        ("adapter_config.json", "not valid JSON"),
        True,
    ),
    Case("adapter-config-a-list", _damaged(lambda a: _set_config(a, "[1]")), 1, ("adapter_config.json", "list"), True),
    Case(
        "adapter-config-missing",
        _damaged(lambda a: (a / "adapter_config.json").unlink()),
        1,
        ("adapter_config.json", "missing"),
        True,
    ),
    Case(
        "adapter-nan-weights",
        _damaged(lambda a: _write_weights(a, float("nan"))),
        1,
        ("adapter_model.safetensors", "NaN"),
        True,
    ),
    Case(
        "adapter-inf-weights",
        _damaged(lambda a: _write_weights(a, float("inf"))),
        1,
        ("adapter_model.safetensors", "infinite"),
        True,
    ),
    Case(
        "adapter-dir-missing",
        lambda env: env.eval_argv(env.tmp / "no-adapter"),
        1,
        ("no-adapter", "does not exist"),
        True,
    ),
    Case(
        "adapter-dir-is-file", lambda env: env.eval_argv(env.csv("a.txt", "x")), 1, ("a.txt", "not a directory"), True
    ),
    Case(
        "adapter-cell-json-invalid",
        _damaged(lambda a: (a / "cell.json").write_text("{")),
        1,
        ("cell.json", "not valid JSON"),
        True,
    ),
    Case(
        "adapter-init-weights-garbage",
        _damaged(lambda a: (a / "initialized_weights.safetensors").write_bytes(b"\x00" * 64)),
        1,
        ("initialized_weights.safetensors", "not a valid safetensors"),
        True,
    ),
    Case("python-load-pickle", _python_load(_replace_weights_by_pickle), ValueError, ("adapter_model.bin", "pickled")),
    Case(
        "python-load-nan",
        _python_load(lambda a: _write_weights(a, float("nan"))),
        ValueError,
        ("adapter_model.safetensors", "NaN"),
    ),
    Case("python-check-peft_type", _check(lambda a: _peft_type(a, "X")), ValueError, ("adapter_config.json", "'X'")),
    # ---- interruption ----
    Case(
        "interrupt-bench",
        _interrupted_bench,
        130,
        ("interrupted after 1 of 2 cells", "badnets/lora/seed0", "Re-running the same command resumes"),
        True,
    ),
    Case("interrupt-train", _interrupted_train, 130, ("interrupted",), True, _finished_cell_untouched),
]


@pytest.fixture(scope="module")
def finished_cell(tiny_bert: Path, attack_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """One finished `lora` cell on the tiny BERT (trained once for the module; cases copy it before changing it)."""
    from peft_musclelora.benchmark.runner import train_cell

    files = attack_dir / "sst-2" / "poison" / ATTACK
    out = tmp_path_factory.mktemp("cell")
    train_cell(
        "lora",
        files / "train-mixed-0.1.csv",
        files / "dev-clean.csv",
        out,
        model_dir=tiny_bert,
        overrides={"num_train_epochs": 1},
        test_clean=files / "test-clean.csv",
        test_poison=files / "test-poison.csv",
        progress=False,
    )
    return out


def test_the_table_covers_every_kind_of_bad_input() -> None:
    assert len(CASES) >= 60 and len({case.id for case in CASES}) == len(CASES)
    kinds = {case.id.split("-")[0] for case in CASES}
    assert {"config", "args", "data", "cli", "adapter", "interrupt"} <= kinds


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_naming_the_field_and_value(
    case: Case,
    tiny_bert: Path,  # noqa: F811
    attack_dir: Path,  # noqa: F811
    finished_cell: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = Env(tiny_bert, attack_dir, attack_dir / "sst-2" / "poison" / ATTACK, finished_cell, tmp_path)
    env.monkeypatch = monkeypatch  # type: ignore[attr-defined]
    if case.cli:
        argv = case.run(env)
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as exit_info:  # argparse's usage errors
            code = exit_info.code
        err = capsys.readouterr().err
        assert code == case.expect, err
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith("musclelora"), err
        message = lines[-1]
    elif isinstance(case.expect, type) and issubclass(case.expect, Warning):
        with pytest.warns(case.expect) as record:
            case.run(env)
        message = " ".join(str(w.message) for w in record)
    else:
        with pytest.raises(case.expect) as info:
            case.run(env)
        message = str(info.value)
        assert "\n" not in message.strip()
    for text in case.says:
        assert text in message, f"{text!r} not in {message!r}"
    if case.after is not None:
        case.after(env)
