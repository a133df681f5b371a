"""The table of docs/results.md for `benchmarks/poison_sweep.sh`: per poison rate, attack and mode, undefended LoRA
and `recommended` against the oracle of the same trigger.

    python benchmarks/poison_sweep_report.py [RUNS_DIR]      (default runs/poison-sweep)

Reads every cell's metrics.json (the bench's own files, nothing recomputed). The oracle trains on `train-clean.csv`
and is scored on `test-poison.csv`; both are the same bytes at every rate and in both modes (the script checks the
hashes `poison_sweep.sh` wrote), so one oracle cell per trigger is the floor of its eight cells. A cell not
finished is printed as `not run`.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

RATES = ("0.01", "0.05", "0.1", "0.2")
ATTACKS = ("badnets", "addsent")
MODES = ("dirty", "clean")
METHODS = ("lora", "recommended")
METRICS = "metrics.json"


def read_cell(path: Path) -> Optional[dict[str, Any]]:
    """A finished cell's metrics, or None."""
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics.get("status") == "ok" else None


def check_hashes(runs: Path) -> None:
    """One hash per oracle input: the clean training set, and each trigger's test-poison.csv."""
    groups: dict[str, set[str]] = defaultdict(set)
    for line in (runs / "hashes.txt").read_text().splitlines():
        digest, path = line.split()
        name = Path(path).name
        attack = Path(path).parent.name.split("-")[0]
        groups[name if name == "train-clean.csv" else f"{attack}/{name}"].add(digest)
    differing = {key: len(digests) for key, digests in groups.items() if len(digests) != 1}
    if differing:
        raise SystemExit(f"the oracle's inputs differ across folders: {differing}")


def pct(value: Optional[float]) -> str:
    return "not run" if value is None else f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="?", default="runs/poison-sweep")
    runs = Path(parser.parse_args().runs)
    check_hashes(runs)
    oracle = {
        attack: read_cell(
            runs / "cells" / "oracle" / "cells" / f"{attack}-dirty" / "oracle" / "seed0" / "metrics.json"
        )
        for attack in ATTACKS
    }
    print("| attack | mode | rate | poisoned rows (of 2000) | method | CACC | ASR | excess ASR | false-target rate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for attack in ATTACKS:
        floor = oracle[attack]
        if floor is not None:
            row = [attack, "–", "–", "0", "oracle", pct(floor["cacc"]), pct(floor["asr"]), "+0.0"]
            print("| " + " | ".join([*row, pct(floor["false_target_rate"])]) + " |")
        for mode in MODES:
            for rate in RATES:
                for method in METHODS:
                    cell = runs / "cells" / f"r{rate}" / "cells" / f"{attack}-{mode}" / method / "seed0"
                    metrics = read_cell(cell / "metrics.json")
                    if metrics is None:
                        print(f"| {attack} | {mode}-label | {rate} | – | {method} | not run | | | |")
                        continue
                    excess = "–" if floor is None else f"{100 * (metrics['asr'] - floor['asr']):+.1f}"
                    row = [attack, f"{mode}-label", rate, str(metrics["data"]["train"]["poisoned"]), method]
                    row += [pct(metrics["cacc"]), pct(metrics["asr"]), excess, pct(metrics["false_target_rate"])]
                    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
