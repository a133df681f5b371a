"""benchmarks/profile_stages.py: a py-spy profile summed by the defense's stages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "profile_stages", Path(__file__).parents[2] / "benchmarks" / "profile_stages.py"
)
profile_stages = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(profile_stages)


def test_a_sample_counts_for_every_stage_on_its_stack_and_a_part_only_within_its_stage():
    lines = [
        "<module> (m.py:1);run_unlearning (u.py:5);Tensor.backward (t.py:9) 7",
        "<module> (m.py:1);run_unlearning (u.py:5);trigger_insertion_loss (u.py:8);forward (b.py:3) 3",
        "<module> (m.py:1);run_unlearning (u.py:5);Module._wrapped_call_impl (n.py:2) 2",  # the isolated forward
        "<module> (m.py:1);Trainer._inner_training_loop (t.py:1);Tensor.backward (t.py:9) 5",  # not the phase's
        "",
    ]
    counts, total = profile_stages.stage_samples(lines)
    assert total == 17
    assert counts["unlearning phase"] == 12 and counts["training on the kept rows"] == 5
    assert counts["  backward (all three batches)"] == 7  # the training's backward lies outside the phase
    assert counts["  inserted copies: forward and reference forward"] == 3
    assert profile_stages.rest(counts)["  unlearning phase: the rest"] == 2
