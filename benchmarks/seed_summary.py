"""Per-attack mean and spread over seeds of finished cells (issue 20's three-seed table).

Reads every `metrics.json` under the given directories (bench output directories or single `musclelora train`
cells) and prints, per cell, CACC, ASR, the share of clean rows the row filter dropped, the recall of poisoned rows
(both from the poison flags, which the defense never reads) and the training time; then, per attack, the mean and
sample standard deviation over its seeds. With `--oracle ATTACK=ASR` (percent, the oracle of the same attack) the
excess ASR of each mean is printed too. A cell without an `attack` (a `musclelora train` run) is grouped as
`unpoisoned` when its training file has no poisoned row, else under its directory's name.

    python benchmarks/seed_summary.py runs/s10-poe-l6-badnets runs/s10-poe-l6-badnets-s1 --oracle badnets=8.9
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

COLUMNS = ("cacc", "asr", "clean_dropped", "poisoned_recall", "train_time_s")


def cell_values(metrics: dict) -> dict[str, float | None]:
    """The table's columns of one cell, in percent except the time (None where the cell has no value)."""
    row_filter = metrics.get("row_filter") or {}
    values = {
        "cacc": metrics.get("cacc"),
        "asr": metrics.get("asr"),
        "clean_dropped": row_filter.get("clean_dropped"),
        "poisoned_recall": row_filter.get("poisoned_recall"),
    }
    scaled: dict[str, float | None] = {k: None if v is None else 100 * v for k, v in values.items()}
    scaled["train_time_s"] = metrics.get("train_time_s")
    return scaled


def group_of_train_cell(metrics: dict, path: Path) -> str:
    """`unpoisoned` for a `musclelora train` cell trained on rows with no poisoned row, else its directory's name."""
    return "unpoisoned" if metrics.get("data", {}).get("train", {}).get("poisoned") == 0 else path.parent.name


def _cell(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", type=Path, help="Directories holding finished cells")
    parser.add_argument("--oracle", action="append", default=[], help="ATTACK=ASR (percent), repeatable")
    args = parser.parse_args()
    oracle = {}
    for item in args.oracle:
        attack, _, value = item.partition("=")
        if not value:
            parser.error(f"--oracle must be ATTACK=ASR, got {item!r}")
        oracle[attack] = float(value)
    groups: dict[str, list[dict[str, float | None]]] = defaultdict(list)
    print("| attack | seed | CACC | ASR | clean rows dropped (%) | poisoned recall (%) | train time (s) | cell |")
    print("|---|---|---|---|---|---|---|---|")
    for directory in args.directories:
        for path in sorted(directory.rglob("metrics.json")):
            metrics = json.loads(path.read_text())
            if metrics.get("status", "ok") != "ok":
                continue
            attack = metrics.get("attack") or group_of_train_cell(metrics, path)
            values = cell_values(metrics)
            groups[attack].append(values)
            shown = " | ".join(_cell(values[column]) for column in COLUMNS)
            print(f"| {attack} | {metrics.get('seed')} | {shown} | {path.parent} |")
    print()
    header = ("attack", "seeds", "CACC", "ASR", "excess ASR over the oracle", "clean rows dropped (%)")
    header += ("poisoned recall (%)",)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for attack, cells in groups.items():
        column = {name: [c[name] for c in cells if c[name] is not None] for name in COLUMNS}
        excess = "–"
        if attack in oracle and column["asr"]:
            excess = f"{statistics.mean(column['asr']) - oracle[attack]:+.1f}"
        print(
            f"| {attack} | {len(cells)} | {mean_std(column['cacc'])} | {mean_std(column['asr'])} | {excess} | "
            f"{mean_std(column['clean_dropped'])} | {mean_std(column['poisoned_recall'])} |"
        )


if __name__ == "__main__":
    main()
