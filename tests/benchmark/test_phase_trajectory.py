"""benchmarks/phase_trajectory.py: guard rules replayed on a recorded unlearning phase."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "phase_trajectory", Path(__file__).parents[2] / "benchmarks" / "phase_trajectory.py"
)
phase_trajectory = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(phase_trajectory)


def _path(accuracies, log_probs=None, refit=None):
    log_probs = log_probs or [[-0.3, -0.4, -0.5, -0.2]] * len(accuracies)
    return [
        {
            "step": 10 * index,
            "accuracy": accuracy,
            "trusted_label_log_probs": log_probs[index],
            "trusted_accuracy_refit": (refit or accuracies)[index],
        }
        for index, accuracy in enumerate(accuracies)
    ]


def test_the_current_rule_keeps_the_last_state_within_the_drop_even_after_a_dip():
    assert phase_trajectory.current(_path([0.85, 0.70, 0.845, 0.80])) == 20
    assert phase_trajectory.current(_path([0.85, 0.70, 0.80])) == 0  # nothing passes: the trained model


def test_smoothing_refuses_a_lone_state_that_recovered_between_two_failures():
    path = _path([0.855, 0.81, 0.77, 0.855, 0.80])
    assert phase_trajectory.current(path) == 30
    assert phase_trajectory.smoothed(path) == 0
    assert phase_trajectory.smoothed(_path([0.85, 0.85, 0.845, 0.85])) == 30  # the last one averages with one


def test_a_stable_state_needs_the_next_measurement_to_pass_too():
    assert phase_trajectory.stable(_path([0.85, 0.85, 0.85, 0.83, 0.85, 0.70])) == 10
    assert phase_trajectory.stable(_path([0.85, 0.85, 0.85])) == 20  # the last state has no next one


def test_early_stopping_picks_the_best_trusted_accuracy_and_the_later_state_on_a_tie():
    assert phase_trajectory.best_guard(_path([0.85, 0.86, 0.80, 0.86, 0.84])) == 30


def test_the_refit_rule_reads_the_accuracy_after_the_refit():
    path = _path([0.85, 0.80, 0.80], refit=[0.85, 0.85, 0.83])
    assert phase_trajectory.refit_accuracy(path) == 10


def test_the_paired_loss_rule_refuses_a_state_whose_trusted_loss_rose_at_the_same_accuracy():
    start = [-0.10, -0.20, -0.15, -0.30] * 25
    worse = [value - 0.5 - 0.01 * (index % 3) for index, value in enumerate(start)]
    path = _path([0.85, 0.85], log_probs=[start, worse])
    assert phase_trajectory.current(path) == 10
    assert phase_trajectory.accuracy_and_loss(path) == 0
    assert phase_trajectory.accuracy_and_loss(_path([0.85, 0.85], log_probs=[start, start])) == 10


def test_the_summary_scores_every_rule_on_the_state_it_keeps(tmp_path, capsys):
    path = _path([0.85, 0.70, 0.845])
    for point, cacc in zip(path, (0.86, 0.80, 0.84)):
        point["refit"] = {"cacc": cacc, "asr": 0.2, "false_target_rate": 0.1}
        point["raw"] = {"cacc": cacc, "asr": 0.3, "false_target_rate": 0.05}
    report = {"attack": "badnets", "seed": 0, "chosen_step": 20, "path": path}
    (tmp_path / phase_trajectory.TRAJECTORY_FILE).write_text(json.dumps(report))
    phase_trajectory.summarize([tmp_path])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| badnets s0"))
    assert "| 20: 84.0 / 20.0 |" in row  # the current rule keeps step 20
    assert row.endswith("| 0: 86.0 / 20.0 |")  # the test-picked ceiling


def test_the_remedies_table_reads_the_cell_the_model_before_the_phase_and_the_evidence_the_filter_saved(
    tmp_path, capsys
):
    path = _path([0.85, 0.80, 0.84])
    scores = [((0.86, 0.05, 0.1), (0.87, 0.15, 0.2)), ((0.8, 0.0, 0.0), (0.8, 0.0, 0.0))]
    scores.append(((0.84, 0.03, 0.1), (0.85, 0.09, 0.2)))
    for point, (raw, refit) in zip(path, scores):
        point["raw"] = dict(zip(phase_trajectory.METRICS, raw))
        point["refit"] = dict(zip(phase_trajectory.METRICS, refit))
    report = {"attack": "addsent-dirty", "seed": 1, "chosen_step": 20, "path": path}
    (tmp_path / phase_trajectory.TRAJECTORY_FILE).write_text(json.dumps(report))
    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / "row_filter.json").write_text(json.dumps({"plain_training": {"evidence": {"z": 3.389}}}))
    phase_trajectory.summarize([tmp_path])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| addsent-dirty s1")][-1]
    kept_refit, kept_raw = "85.0 / 9.0 / 20.0", "84.0 / 3.0 / 10.0"  # step 20, the state the guard kept
    before_raw, before_refit = "86.0 / 5.0 / 10.0", "87.0 / 15.0 / 20.0"  # step 0, the model the phase started from
    assert row == f"| addsent-dirty s1 | 3.39 | 20 | {kept_refit} | {before_raw} | {kept_raw} | {before_refit} |"


def test_the_recorder_scores_each_state_a_guard_reads_and_gives_the_reading_back_with_the_random_state():
    import torch

    from peft_musclelora import unlearning

    recorder = phase_trajectory.PathRecorder(clean=None, poison=None, target_label=1)
    recorder._score = lambda trainer, model, dataset: {"drawn": float(torch.rand(1))}  # scoring draws randomness
    reading = unlearning.GuardReading(0.8, torch.tensor([-0.1, -0.2]))
    read = recorder.wrap(lambda trainer, model, dataset: reading)
    model = torch.nn.Linear(1, 1).eval()
    state = torch.get_rng_state()

    assert read(None, model, None) is reading
    assert torch.equal(torch.get_rng_state(), state)  # the phase draws what it would have drawn unrecorded
    assert [set(point) for point in recorder.points] == [{"accuracy", "drawn"}]
    assert recorder.points[0]["accuracy"] == 0.8
    assert model.training


def test_once_installed_the_recorder_sees_the_states_every_declared_guard_reads(monkeypatch):
    import torch

    from peft_musclelora import unlearning
    from peft_musclelora.row_filter import UNLEARN_GUARDS

    monkeypatch.setattr(unlearning, "GUARDS", dict(unlearning.GUARDS))  # the test's own copy
    for name, guard in unlearning.GUARDS.items():
        unlearning.GUARDS[name] = guard._replace(read=lambda trainer, model, dataset: unlearning.GuardReading(0.5))
    recorder = phase_trajectory.PathRecorder(clean=None, poison=None, target_label=1)
    recorder._score = lambda trainer, model, dataset: {}
    recorder.install()

    model = torch.nn.Linear(1, 1)
    for name in UNLEARN_GUARDS:  # as the phase does: the guard looked up by its name when the phase starts
        assert unlearning.GUARDS[name].read(None, model, None).accuracy == 0.5
    assert recorder.points == [{"accuracy": 0.5}] * len(UNLEARN_GUARDS)
