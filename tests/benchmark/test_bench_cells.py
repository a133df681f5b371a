"""When a finished cell is the cell a run asks for (`settings_diff`), for cells written by older versions."""

from __future__ import annotations

from pathlib import Path

from peft_musclelora.benchmark.cells import BenchRun, settings_diff
from peft_musclelora.benchmark.data import SharedData
from peft_musclelora.benchmark.overrides import parse_set_items


def _run(tmp_path: Path, *items: str) -> BenchRun:
    shared = SharedData(root=tmp_path)
    return BenchRun(shared, tmp_path / "out", "model", "full", parse_set_items(list(items)))


def _finished(run: BenchRun, method: str) -> dict:
    """The metrics.json fields `settings_diff` reads, as `run` would have written them for `method`."""
    return {"bench_preset": "full", "model_dir": "model", "cell_settings": run.spec(method).settings()}


def _drop(settings: dict, *path: str) -> None:
    for key in path[:-1]:
        settings = settings[key]
    del settings[path[-1]]


def test_a_knob_added_after_a_cell_was_written_is_no_difference_at_its_default(tmp_path: Path) -> None:
    run = _run(tmp_path)
    for method, section in (("lora", "preset"), ("zdefence", "undefended")):  # a defense records its lora cell
        previous = _finished(run, method)
        _drop(previous["cell_settings"], section, "training", "row_filter", "row_filter_teacher_steps")
        assert settings_diff(previous, run, run.spec(method)) == []


def test_a_knob_added_after_a_cell_was_written_differs_when_set_away_from_its_default(tmp_path: Path) -> None:
    previous = _finished(_run(tmp_path), "zdefence")
    _drop(previous["cell_settings"], "undefended", "training", "row_filter", "row_filter_teacher_steps")
    run = _run(tmp_path, "row_filter_teacher_steps=10")
    assert "undefended.training.row_filter.row_filter_teacher_steps: None -> 10" in settings_diff(
        previous, run, run.spec("zdefence")
    )


def test_a_recorded_knob_still_differs_when_this_run_sets_it_back_to_its_default(tmp_path: Path) -> None:
    previous = _finished(_run(tmp_path, "row_filter_teacher_steps=10"), "lora")
    run = _run(tmp_path)
    assert settings_diff(previous, run, run.spec("lora")) == [
        "preset.training.row_filter.row_filter_teacher_steps: 10 -> 144"
    ]
