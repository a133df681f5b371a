"""The row filter as a bench cell: `fit-gap` trains LoRA on the rows its row filter keeps and saves why."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_musclelora.benchmark.cli import main


def _train(tiny_bert: Path, attack_dir: Path, out: Path, method: str, items: list[str]) -> int:
    """`musclelora train --method METHOD` on the tiny BadNets set: one epoch, 12 trusted rows, probes at steps 2, 4."""
    files = attack_dir / "sst-2" / "poison" / "badnets"
    common = ["num_train_epochs=1", "reference_split_size=12", "row_filter_probe_steps=2,4"]
    return main(
        ["train", "--method", method, "--train", str(files / "train-mixed-0.1.csv")]
        + ["--dev", str(files / "dev-clean.csv"), "--test-clean", str(files / "test-clean.csv")]
        + ["--test-poison", str(files / "test-poison.csv"), "--model", str(tiny_bert), "--output-dir", str(out)]
        + [arg for item in common + items for arg in ("--set", item)]
        + ["--quiet"]
    )


def test_a_fit_gap_cell_saves_every_rows_decision_and_reports_recall_from_the_flags(
    tiny_bert: Path, attack_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cell"
    assert _train(tiny_bert, attack_dir, out, "fit-gap", ["row_filter_max_clean_drop=0.2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    decisions = json.loads((out / "row_filter.json").read_text())
    report = metrics["row_filter"]
    assert len(decisions["rows"]) == report["rows"] == 44  # 40 clean + 4 poisoned rows
    assert report["kept"] + report["fit_early"] + report["contradicted"] == 44
    assert {"index", "text", "label", "fold", "losses", "low", "high", "reason"} <= set(decisions["rows"][0])
    assert all(len(row["losses"]) == 2 for row in decisions["rows"])
    dropped = [row["reason"] != "keep" for row in decisions["rows"]]
    assert report["clean_dropped"] == sum(dropped[:40]) / 40 and report["poisoned_recall"] == sum(dropped[40:]) / 4
    assert metrics["reference_rows"] == 12 and metrics["dev_rows_for_selection"] == 12
    assert metrics["data"]["train"]["rows"] == 44  # the cell reports the data it was given, not the kept rows
    history = json.loads((out / "log_history.json").read_text())
    assert next(entry for entry in history if "loss" in entry)["row_filter/kept"] == report["kept"]


@pytest.mark.parametrize(("extend_tails", "contradicted"), [(False, "drop"), (True, "drop"), (False, "keep")])
def test_a_cells_decisions_can_be_recomputed_from_its_row_filter_json_alone(
    tiny_bert: Path, attack_dir: Path, tmp_path: Path, extend_tails: bool, contradicted: str
) -> None:
    out = tmp_path / "cell"
    items = ["row_filter_max_clean_drop=0.2", f"row_filter_extend_tails={str(extend_tails).lower()}"]
    items.append(f"row_filter_contradicted={contradicted}")
    assert _train(tiny_bert, attack_dir, out, "fit-gap", items) == 0
    decisions = json.loads((out / "row_filter.json").read_text())
    assert torch.tensor(decisions["reference"]["losses"]).shape == (2, 2, 12)  # (folds, probe steps, trusted rows)
    spec = importlib.util.spec_from_file_location("recut", Path(__file__).parents[2] / "benchmarks" / "recut.py")
    recut = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recut)
    reasons, reference_flagged, tails = recut.recut(decisions, 0.2, extend_tails, contradicted != "keep")
    assert reasons == [row["reason"] for row in decisions["rows"]]
    assert tails == decisions["summary"]["tails"]
    assert decisions["summary"]["contradicted_action"] == contradicted
    assert contradicted == "drop" or "contradicted" not in reasons
    assert reference_flagged == decisions["summary"]["reference_flagged"]


def test_a_fit_gap_unlearn_cell_reports_the_unlearning_phase(
    tiny_bert: Path, attack_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cell"
    items = ["row_filter_max_clean_drop=0.45", "row_filter_unlearn_steps=4", "row_filter_unlearn_eval_every=2"]
    items.append("row_filter_unlearn_significance=none")  # 44 rows are too few for the evidence test
    assert _train(tiny_bert, attack_dir, out, "fit-gap-unlearn", items) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    decisions = json.loads((out / "row_filter.json").read_text())
    phase = decisions["unlearning"]
    assert phase["isolated"] == metrics["row_filter"]["unlearn_isolated"] == metrics["row_filter"]["fit_early"]
    assert metrics["row_filter"]["unlearn_chosen_step"] == phase["chosen_step"] in (0, 2, 4)
    assert phase["isolated"] > 0 and [point["step"] for point in phase["guard"]] == [0, 2, 4]
    assert phase["skipped"] is None and metrics["row_filter"]["unlearn_skipped"] is None


def test_a_fit_gap_unlearn_cell_reports_a_skipped_phase_and_its_evidence(
    tiny_bert: Path, attack_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cell"
    assert _train(tiny_bert, attack_dir, out, "fit-gap-unlearn", ["row_filter_unlearn_significance=0.001"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    phase = json.loads((out / "row_filter.json").read_text())["unlearning"]
    assert not phase["evidence"]["passed"] and phase["guard"] == []
    assert metrics["row_filter"]["unlearn_skipped"] == phase["skipped"]
    assert metrics["row_filter"]["unlearn_evidence_z"] == phase["evidence"]["z"] < phase["evidence"]["threshold"]


def test_a_recommended_cell_trains_the_kept_rows_against_the_shallow_expert_and_the_gated_teacher(
    tiny_bert: Path, attack_dir: Path, tmp_path: Path
) -> None:
    def first_loss(out: Path) -> float:
        history = json.loads((out / "log_history.json").read_text())
        return next(entry["loss"] for entry in history if "loss" in entry)

    items = ["row_filter_max_clean_drop=0.2", "row_filter_teacher_steps=3"]
    assert _train(tiny_bert, attack_dir, tmp_path / "recommended", "recommended", items) == 0
    decisions = json.loads((tmp_path / "recommended" / "row_filter.json").read_text())
    summary = decisions["summary"]
    assert summary["shallow_probe"] == "ngram" and summary["shallow_expert_weight"] == 4.0
    assert summary["teacher_mix"] == 0.5 and summary["teacher_mix_gate"] == "model_contradicts"
    assert all(len(row["shallow_log_probs"]) == 2 and len(row["losses"]) == 3 for row in decisions["rows"])
    assert all(len(row["teacher_log_probs"]) == 2 for row in decisions["rows"])
    # the output bias is refitted on the trusted rows exactly when the unlearning phase ran
    assert ("bias_refit" in decisions) == (decisions["unlearning"]["skipped"] is None)
    plain = ["row_filter_shallow_expert_weight=1"]
    assert _train(tiny_bert, attack_dir, tmp_path / "weight-1", "recommended", items + plain) == 0
    # Same seed, same rows kept, same first batch: only the product-of-experts loss differs.
    assert first_loss(tmp_path / "recommended") != first_loss(tmp_path / "weight-1")


def test_a_cell_with_the_trusted_teacher_and_the_bias_refit_saves_both_and_the_adapter_carries_the_refit(
    tiny_bert: Path, attack_dir: Path, tmp_path: Path
) -> None:
    items = ["row_filter_max_clean_drop=0.2", "row_filter_teacher_mix=0.5", "row_filter_teacher_steps=3"]
    assert _train(tiny_bert, attack_dir, tmp_path / "refit", "fit-gap", items + ["row_filter_refit_bias=true"]) == 0
    assert _train(tiny_bert, attack_dir, tmp_path / "plain", "fit-gap", items) == 0
    decisions = json.loads((tmp_path / "refit" / "row_filter.json").read_text())
    metrics = json.loads((tmp_path / "refit" / "metrics.json").read_text())
    assert decisions["summary"]["teacher_mix"] == 0.5 and decisions["summary"]["teacher_steps"] == 3
    assert all(len(row["teacher_log_probs"]) == 2 for row in decisions["rows"])
    refit = decisions["bias_refit"]
    assert metrics["row_filter"]["bias_offset"] == refit["offset"] and refit["trusted_rows"] == 12
    assert "bias_refit" not in json.loads((tmp_path / "plain" / "row_filter.json").read_text())
    # Same seed, same rows, same training: the saved adapters differ by the offset on the output bias alone.
    weights = {
        name: load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("refit", "plain")
    }
    (bias,) = [key for key in weights["plain"] if key.endswith("classifier.bias")]
    moved = weights["refit"][bias] - weights["plain"][bias]
    assert torch.allclose(moved.double(), torch.tensor(refit["offset"], dtype=torch.float64), atol=1e-6)
    assert all(torch.equal(weights["refit"][key], weights["plain"][key]) for key in weights["plain"] if key != bias)


def test_a_cell_whose_teacher_speaks_for_the_contradicted_rows_reports_them_taught_not_dropped(
    tiny_bert: Path, attack_dir: Path, tmp_path: Path
) -> None:
    items = ["row_filter_max_clean_drop=0.45", "row_filter_teacher_mix=0.5", "row_filter_teacher_steps=3"]
    assert (
        _train(tiny_bert, attack_dir, tmp_path / "cell", "fit-gap", items + ["row_filter_contradicted=teacher"]) == 0
    )
    metrics = json.loads((tmp_path / "cell" / "metrics.json").read_text())["row_filter"]
    reasons = [row["reason"] for row in json.loads((tmp_path / "cell" / "row_filter.json").read_text())["rows"]]
    assert metrics["contradicted_action"] == "teacher" and "contradicted" in reasons
    clean, poisoned = reasons[:40], reasons[40:]  # 40 clean + 4 poisoned rows
    # dropped: not trained on (fit-early only); taught: trained on the teacher's distribution; recall: flagged at all
    assert metrics["clean_dropped"] == clean.count("fit-early") / 40
    assert metrics["clean_taught"] == clean.count("contradicted") / 40
    assert metrics["poisoned_taught"] == poisoned.count("contradicted") / 4
    assert metrics["poisoned_recall"] == sum(reason != "keep" for reason in poisoned) / 4


def test_a_cell_with_weight_averaging_records_which_average_it_ended_on(
    tiny_bert: Path, attack_dir: Path, tmp_path: Path
) -> None:
    items = ["row_filter_max_clean_drop=0.2", "row_filter_weight_average_decay=0.9"]
    assert _train(tiny_bert, attack_dir, tmp_path / "averaged", "fit-gap", items) == 0
    decisions = json.loads((tmp_path / "averaged" / "row_filter.json").read_text())
    metrics = json.loads((tmp_path / "averaged" / "metrics.json").read_text())
    average = decisions["weight_average"]
    # The benchmark selects its checkpoint by clean-dev accuracy, so the cell ends on the best epoch's average.
    assert average["decay"] == 0.9 and average["kept"] == "best checkpoint" and average["updates"] == metrics["steps"]
    assert metrics["row_filter"]["weight_average_kept"] == "best checkpoint"
