"""Gradient alignment under DDP and FSDP2 (two gloo processes on CPU) against one process on the same global data.

tests/fsdp_ga_train.py is launched once with two processes and runs every case under DDP and FSDP2; this process runs
the single-process reference of each case. The models run in float64, so the 1e-6 relative bound leaves many orders
of magnitude to rounding while a wrong reduction (a missing all-reduce, a sum where a mean belongs) is off at order 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from peft_musclelora.trainer import _check_distributed_engine
from tests.distributed_launch import ROOT, run_two_processes
from tests.fsdp_ga_train import CASES, KEY_SEPARATOR, RESUME_AFTER, RESUME_CASE, build, full_weights, run_case

RTOL = 1e-6  # the bound, relative to the reference tensor's norm (float64 runs: rounding is ~1e-15)
BRANCH = {"aligned": "aligned", "accumulation": "aligned", "subspace": "aligned", "mixed": "mixed", "zero": "zero",
          "ga_params": "aligned"}  # fmt: skip


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """Weights and reports of every rank of the two-process run: ({key: weights}, report) per rank."""
    run_dir = run_two_processes(ROOT / "tests" / "fsdp_ga_train.py", tmp_path_factory.mktemp("distributed"), 600)
    return [(read_weights(run_dir / f"weights{rank}.safetensors"),
             json.loads((run_dir / f"report{rank}.json").read_text())) for rank in range(2)]  # fmt: skip


def read_weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{run: {parameter: tensor}} from the flat file fsdp_ga_train.py writes."""
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for flat, tensor in load_file(path).items():
        key, name = flat.split(KEY_SEPARATOR, 1)
        weights.setdefault(key, {})[name] = tensor
    return weights


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("single"))
    return {case: run_case("single", case, output) for case in CASES}


def ga_entries(log: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{key: value for key, value in entry.items() if key.startswith("ga/")} for entry in log]


def assert_weights_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].dtype == torch.float64
        error = (actual[name] - value).norm().item()
        assert error <= RTOL * value.norm().item(), (name, error, value.norm().item())


def assert_logs_close(actual: list[dict[str, float]], expected: list[dict[str, float]]) -> None:
    # ga/ref_loss is accumulated in float32 over the reference chunks (a few roundings of 6e-8): still within 1e-6
    assert len(actual) == len(expected)
    for got, want in zip(ga_entries(actual), ga_entries(expected)):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=RTOL, abs_tol=0.0), (key, got[key], value)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_run_matches_the_single_process_run(distributed, single, mode, case):
    weights, report = distributed[0]
    expected_weights, expected_log = single[case]
    assert_weights_close(weights[f"{mode}/{case}"], expected_weights)
    assert_logs_close(report["logs"][f"{mode}/{case}"], expected_log)
    # the case exercised what it is named for, on every step
    assert all(entry[f"ga/branch_{BRANCH[case]}"] == 1.0 for entry in expected_log)


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_run_matches_the_ddp_run(distributed, case):
    weights, report = distributed[0]
    assert_weights_close(weights[f"fsdp2/{case}"], weights[f"ddp/{case}"])
    assert_logs_close(report["logs"][f"fsdp2/{case}"], report["logs"][f"ddp/{case}"])


def test_training_moved_the_weights_except_under_the_zero_fallback(single, tmp_path):
    start = full_weights(build("single", "zero", str(tmp_path))[0].model)
    for case in CASES:
        moved = any(not torch.equal(single[case][0][name], start[name]) for name in start)
        assert moved == (case != "zero"), case


def test_ranks_end_with_identical_weights_and_identical_ga_statistics(distributed):
    (weights0, report0), (weights1, report1) = distributed
    for key in weights0:
        for name in weights0[key]:
            assert torch.equal(weights0[key][name], weights1[key][name]), (key, name)
    for key in report0["logs"]:
        assert ga_entries(report0["logs"][key]) == ga_entries(report1["logs"][key]), key


def test_fsdp2_resume_from_a_sharded_checkpoint_reproduces_the_uninterrupted_run(distributed):
    weights, report = distributed[0]
    resumed, uninterrupted = weights["fsdp2/resumed"], weights[f"fsdp2/{RESUME_CASE}"]
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    # the resumed trainer logged only the steps after the checkpoint, with the uninterrupted run's statistics
    tail = ga_entries(report["logs"][f"fsdp2/{RESUME_CASE}"])[RESUME_AFTER:]
    assert ga_entries(report["logs"]["fsdp2/resumed"]) == tail


def test_fsdp2_alignment_is_one_all_reduce_and_gathers_nothing(distributed):
    for _, report in distributed:
        assert report["collectives"] == [{"c10d.allreduce_": 1}] * 2


@pytest.mark.parametrize(
    "what, words",
    [
        ("mixed_plain_and_sharded", "every aligned parameter must be sharded"),
        ("reference_not_sharded", "sharded like the training gradients"),
        ("partial_gradient", "`Partial` gradient"),
        ("fsdp1", "FSDP2's `fully_shard`"),
    ],
)
def test_what_cannot_be_aligned_sharded_is_refused_with_a_value_error(distributed, what, words):
    for _, report in distributed:
        assert words in report["refusals"][what]


def engine(deepspeed: bool = False, fsdp_version: int | None = None) -> SimpleNamespace:
    """What `_check_distributed_engine` reads off a Trainer (which enables FSDP/DeepSpeed on accelerators only)."""
    plugin = None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version)
    return SimpleNamespace(
        is_deepspeed_enabled=deepspeed,
        is_fsdp_enabled=plugin is not None,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
    )


def test_fsdp1_and_deepspeed_are_refused_naming_fsdp2_and_fsdp2_is_accepted():
    with pytest.raises(ValueError, match=r"FSDP1 \(fsdp_version=1.*`fsdp_version: 2`"):
        _check_distributed_engine(engine(fsdp_version=1))
    with pytest.raises(ValueError, match=r"DeepSpeed.*supported: .*FSDP2"):
        _check_distributed_engine(engine(deepspeed=True))
    _check_distributed_engine(engine(fsdp_version=2))
    _check_distributed_engine(engine())


# ---------------------------------------------------------------------------------------------------------------------
# The launcher: a gloo abort is run once more, a Python error is not
# ---------------------------------------------------------------------------------------------------------------------

ABORTS_IN_ITS_FIRST_FOLDER = """
import os, pathlib, sys
run_dir = pathlib.Path(sys.argv[1])
(run_dir / f"rank{os.environ['RANK']}").write_text("ran")
if run_dir.name == "attempt-1" and os.environ["RANK"] == "1":
    os.abort()
"""
RAISES = "raise RuntimeError('a real failure')\n"


def test_a_run_whose_rank_aborts_runs_once_more_in_a_fresh_folder(tmp_path):
    script = tmp_path / "aborts.py"
    script.write_text(ABORTS_IN_ITS_FIRST_FOLDER)
    with pytest.warns(UserWarning, match="died by a signal"):
        run_dir = run_two_processes(script, tmp_path / "out", 120)
    assert run_dir.name == "attempt-2"
    assert sorted(path.name for path in run_dir.iterdir()) == ["rank0", "rank1"]


def test_a_python_error_in_a_rank_fails_without_a_second_run(tmp_path):
    script = tmp_path / "raises.py"
    script.write_text(RAISES)
    with pytest.raises(AssertionError, match="a real failure"):
        run_two_processes(script, tmp_path / "out", 120)
    assert not (tmp_path / "out" / "attempt-2").exists()
