"""The weight-averaging screen's cells side by side: per attack, each variant's CACC / ASR by seed and their means.

Reads the `weight_averages.json` that `weight_average_screen.py` writes; `selected` is the epoch each variant's own
dev accuracy picks (the Trainer's checkpoint selection), `last` the third epoch's.

    python benchmarks/weight_average_summary.py runs-v6/s23-avg-*
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("screens", type=Path, nargs="+", help="output directories of weight_average_screen.py")
    args = parser.parse_args()
    by_attack: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for screen in args.screens:
        path = screen / "weight_averages.json"
        if not path.is_file():
            continue  # still running
        metrics = json.loads((screen / "cell" / "metrics.json").read_text())
        train = Path(metrics["data"]["train"]["source"])
        attack = train.parent.name if metrics["data"]["train"]["poisoned"] else "unpoisoned"
        by_attack[attack].append((metrics["seed"], json.loads(path.read_text())))
    for attack, cells in sorted(by_attack.items()):
        cells.sort(key=lambda cell: cell[0])
        print(f"{attack}, seeds {', '.join(str(seed) for seed, _ in cells)} (CACC / ASR, %)")
        variants = [name for name in cells[0][1] if name != "cell"]
        for which in ("selected", "last"):
            for variant in variants:
                scores = [report[variant][which] for _, report in cells]
                per_seed = "  ".join(f"{100 * s['cacc']:.1f} / {100 * s['asr']:4.1f}" for s in scores)
                cacc = 100 * sum(s["cacc"] for s in scores) / len(scores)
                asr = 100 * sum(s["asr"] for s in scores) / len(scores)
                print(f"  {which:8s} {variant:10s} {per_seed}   mean {cacc:.2f} / {asr:.1f}")


if __name__ == "__main__":
    main()
