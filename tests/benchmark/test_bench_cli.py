"""End-to-end specification of the `musclelora` command on a tiny offline BERT and a few dozen rows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peft_musclelora.benchmark.builders import build_model
from peft_musclelora.benchmark.cli import main
from peft_musclelora.benchmark.presets import get_preset


def test_the_library_does_not_import_the_benchmark() -> None:
    code = "import sys, peft_musclelora; print(any('peft_musclelora.benchmark' in m for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("command", ["train", "eval", "bench", "presets"])
def test_every_subcommand_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: musclelora" in capsys.readouterr().out


def test_mslr_freezes_the_random_head_and_trains_only_adapters(tiny_bert: Path) -> None:
    model, _, initialized = build_model(get_preset("mslr"), tiny_bert, num_labels=2, seed=0)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "musclelora_" in name for name in trainable)
    assert any("pooler.dense.musclelora_" in name for name in trainable)
    assert sorted(initialized) == ["classifier.bias", "classifier.weight"]
    lora, _, _ = build_model(get_preset("lora"), tiny_bert, num_labels=2, seed=0)
    assert any("classifier" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_head_pattern_that_matches_nothing_names_the_alternative(tiny_bert: Path) -> None:
    with pytest.raises(ValueError, match="head_pattern 'score' matches no module .*for bert use 'pooler.dense'"):
        build_model(get_preset("mslr", {"head_pattern": "score"}), tiny_bert, num_labels=2, seed=0)


def test_train_then_eval_reproduces_the_test_metrics(
    tiny_bert: Path, attack_dir: Path, tmp_path: Path, capsys
) -> None:
    files = attack_dir / "sst-2" / "poison" / "badnets"
    out = tmp_path / "cell"
    code = main(
        [
            "train",
            "--method",
            "mslr",
            "--train",
            str(files / "train-mixed-0.1.csv"),
            "--dev",
            str(files / "dev-clean.csv"),
        ]
        + ["--test-clean", str(files / "test-clean.csv"), "--test-poison", str(files / "test-poison.csv")]
        + [
            "--model",
            str(tiny_bert),
            "--output-dir",
            str(out),
            "--seed",
            "1",
            "--set",
            "num_train_epochs=1",
            "--quiet",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["method"] == "mslr" and metrics["seed"] == 1 and metrics["steps"] == 2
    assert {"cacc", "asr", "false_target_rate", "train_time_s", "versions", "data", "preset"} <= set(metrics)
    assert metrics["data"]["train"]["poisoned"] == 4 and metrics["data"]["test_poison"]["rows"] == 10
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoints").exists()
    history = json.loads((out / "log_history.json").read_text())  # kept after the checkpoints are gone
    assert [entry["epoch"] for entry in history if "eval_accuracy" in entry] == [1.0]
    capsys.readouterr()

    report = tmp_path / "eval.json"
    code = main(
        ["eval", "--adapter", str(out / "adapter"), "--clean", str(files / "test-clean.csv")]
        + ["--poison", str(files / "test-poison.csv"), "--output", str(report), "--quiet"]
    )
    assert code == 0
    evaluated = json.loads(report.read_text())
    for key in ("cacc", "asr", "false_target_rate"):
        assert evaluated[key] == pytest.approx(metrics[key])


def test_train_and_eval_read_an_attack_folder_by_name(tiny_bert: Path, attack_dir: Path, tmp_path: Path) -> None:
    files = attack_dir / "sst-2" / "poison" / "badnets"
    out = tmp_path / "cell"
    by_name = ["--data", str(attack_dir), "--task", "sst-2", "--attack", "badnets"]
    argv = ["train", "--method", "lora", *by_name, "--model", str(tiny_bert), "--output-dir", str(out)]
    assert main([*argv, "--set", "num_train_epochs=1", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    sources = {name: Path(entry["source"]).name for name, entry in metrics["data"].items()}
    assert sources == {
        "train": "train-mixed-0.1.csv",
        "dev": "dev-clean.csv",
        "test_clean": "test-clean.csv",
        "test_poison": "test-poison.csv",
    }
    assert metrics["data"]["train"]["poisoned"] == 4 and "asr" in metrics
    report = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(out / "adapter"), *by_name, "--output", str(report), "--quiet"]) == 0
    evaluated = json.loads(report.read_text())
    assert evaluated["cacc"] == pytest.approx(metrics["cacc"]) and evaluated["asr"] == pytest.approx(metrics["asr"])
    assert str(files) in json.dumps(metrics["data"])


def test_eval_of_a_directory_that_is_not_a_cell_fails_with_one_line(tmp_path: Path, capsys) -> None:
    assert main(["eval", "--adapter", str(tmp_path), "--clean", "a", "--poison", "b"]) == 1
    assert "not a saved benchmark cell" in capsys.readouterr().err


def test_bench_runs_reuses_finished_cells_and_records_failures(
    tiny_bert: Path, attack_dir: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "data"
    shutil.copytree(attack_dir, data)
    broken = data / "sst-2" / "poison" / "broken"
    shutil.copytree(data / "sst-2" / "poison" / "badnets", broken)
    (broken / "train-mixed-0.1.csv").write_text(",0,1,2\n0,good film,5,0\n")
    out = tmp_path / "bench"
    argv = ["bench", "--attacks", "badnets,broken", "--methods", "lora", "--data", str(data)]
    argv += ["--model", str(tiny_bert), "--preset", "quick", "--output-dir", str(out), "--seeds", "0", "--quiet"]

    assert main(argv) == 1  # one cell failed, the other finished
    good = json.loads((out / "cells" / "badnets" / "lora" / "seed0" / "metrics.json").read_text())
    bad = json.loads((out / "cells" / "broken" / "lora" / "seed0" / "metrics.json").read_text())
    assert good["status"] == "ok" and good["bench_preset"] == "quick" and good["attack"] == "badnets"
    assert bad["status"] == "error" and "= 5 is out of range" in bad["error"]
    table = (out / "results.md").read_text()
    assert "QUICK PRESET" in table and "| badnets | lora | 0 |" in table and "1 failed" in table
    assert (out / "results.png").stat().st_size > 0

    assert main(argv) == 1
    summary = json.loads((out / "results.json").read_text())
    reused = {(c["attack"], c["reused"]) for c in summary["cells"]}
    assert reused == {("badnets", True), ("broken", False)}
    assert summary["rows"][0]["time_ratio_to_lora"] == pytest.approx(1.0)

    # other settings: a finished cell is not replaced silently; --overwrite trains it again
    assert main([*argv, "--attacks", "badnets", "--set", "r=4"]) == 1
    assert json.loads((out / "results.json").read_text())["overrides"] == []  # nothing ran
    assert main([*argv, "--attacks", "badnets", "--set", "r=4", "--overwrite"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert [(c["attack"], c["reused"]) for c in summary["cells"]] == [("badnets", False)]

    # the same settings spelled differently (order, a default written out) are the same cell
    assert main([*argv, "--attacks", "badnets", "--set", "lora_dropout=0.0", "--set", "r=4"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert [(c["attack"], c["reused"]) for c in summary["cells"]] == [("badnets", True)]

    # a cell written before a knob existed holds no value for it: at the knob's default it is the same cell,
    # set to anything else it is not
    metrics_path = out / "cells" / "badnets" / "lora" / "seed0" / "metrics.json"
    written = json.loads(metrics_path.read_text())
    del written["cell_settings"]["preset"]["training"]["row_filter"]["row_filter_teacher_steps"]
    metrics_path.write_text(json.dumps(written))
    assert main([*argv, "--attacks", "badnets", "--set", "r=4"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert [(c["attack"], c["reused"]) for c in summary["cells"]] == [("badnets", True)]
    assert main([*argv, "--attacks", "badnets", "--set", "r=4", "--set", "row_filter_teacher_steps=10"]) == 1
    assert "row_filter_teacher_steps: None -> 10" in capsys.readouterr().err

    # an override for one method only (`<method>.<field>`) reaches that method's cells
    assert main([*argv, "--attacks", "badnets", "--set", "r=4", "--set", "lora.r=2", "--overwrite"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert [(c["attack"], c["reused"]) for c in summary["cells"]] == [("badnets", False)]
    good = json.loads((out / "cells" / "badnets" / "lora" / "seed0" / "metrics.json").read_text())
    assert good["preset"]["adapter"]["r"] == 2 and good["bench_overrides"][-1] == "lora.r=2"

    # --only-finished trains nothing: finished cells make the table, the others are listed as not run
    finished = [*argv, "--attacks", "badnets", "--set", "r=4", "--set", "lora.r=2", "--methods", "lora,mslr"]
    assert main([*finished, "--only-finished"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert [(c["method"], c["status"], c["reused"]) for c in summary["cells"]] == [
        ("lora", "ok", True),
        ("mslr", "n/a", False),
    ]
    assert "not run: no finished cell with these settings" in (out / "results.md").read_text()
    assert not (out / "cells" / "badnets" / "mslr").exists()


def test_bench_without_data_is_a_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("MUSCLELORA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--attacks", "badnets", "--methods", "lora", "--model", str(tmp_path)]) == 1
    assert "Shared data directory not found" in capsys.readouterr().err
