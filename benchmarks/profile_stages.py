"""Where a defended cell's time goes: a py-spy profile (raw, collapsed stacks) summed by the defense's stages.

Record a cell under py-spy, then read the profile:

    py-spy record -r 10 --format raw -o profile.txt -- musclelora bench --preset quick --attacks addsent \
        --methods fit-gap-inserted --quiet --no-plot --output-dir runs/profile
    python benchmarks/profile_stages.py profile.txt

Each stage is a function of the library; a sample counts for a stage when that function is on its stack (inclusive
time), so the shares of nested stages (the phase's parts within the phase) add up to at most their parent's. The
samples are wall-clock at the recorded rate; a share is the part of the whole process.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

#: (stage, the function whose frames mark it, the stage it lies within or None), in reading order.
STAGES: tuple[tuple[str, str, str | None], ...] = (
    ("row filter", "run_row_filter", None),
    ("  fold probes: training", "_fold_probe_steps", "row filter"),
    ("  fold probes: scoring", "_score", "row filter"),
    ("  trusted teacher", "_trusted_teacher", "row filter"),
    ("training on the kept rows", "_inner_training_loop", None),
    ("training steps", "training_step", None),
    ("  forward", "compute_loss", "training steps"),
    ("  backward", "backward", "training steps"),
    ("unlearning phase", "run_unlearning", None),
    ("  backward (all three batches)", "backward", "unlearning phase"),
    ("  kept batch: forward", "compute_loss", "unlearning phase"),
    ("  inserted copies: forward and reference forward", "trigger_insertion_loss", "unlearning phase"),
    ("  guard (trusted accuracy)", "guard_accuracy", "unlearning phase"),
    ("evaluation", "evaluate", None),
)


def _function(frame: str) -> str:
    """`Class.method` or `function` of a py-spy frame `name (file:line)`, without the class."""
    return frame.split(" (", 1)[0].rsplit(".", 1)[-1]


def stage_samples(lines: list[str]) -> tuple[Counter[str], int]:
    """Samples per stage (inclusive) and in all, from py-spy's raw lines `frame;frame;... count`."""
    counts: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, number = line.rstrip().rpartition(" ")
        if not stack:
            continue
        samples = int(number)
        total += samples
        functions = [_function(frame) for frame in stack.split(";")]
        for stage, function, parent in STAGES:
            if function not in functions:
                continue
            if parent is not None:
                parent_function = next(name for label, name, _ in STAGES if label == parent)
                if parent_function not in functions[: functions.index(function)]:
                    continue
            counts[stage] += samples
    return counts, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--rate", type=float, default=10.0, help="the samples per second py-spy recorded (-r)")
    args = parser.parse_args()
    counts, total = stage_samples(args.profile.read_text().splitlines())
    print(f"{'stage':<52} {'seconds':>8} {'share':>7}")
    for stage, samples in [*((stage, counts[stage]) for stage, _, _ in STAGES), *rest(counts).items()]:
        print(f"{stage:<52} {samples / args.rate:8.1f} {samples / max(total, 1):7.1%}")
    print(f"{'whole process':<52} {total / args.rate:8.1f} {1:7.1%}")


def rest(counts: Counter[str]) -> dict[str, int]:
    """Per stage with named parts, the samples none of its parts holds (the phase: the isolated batch's forward,
    which calls the model directly, and the optimiser)."""
    parents = {parent for _, _, parent in STAGES if parent is not None}
    return {
        f"  {parent}: the rest": counts[parent] - sum(counts[label] for label, _, of in STAGES if of == parent)
        for parent in sorted(parents)
    }


if __name__ == "__main__":
    main()
