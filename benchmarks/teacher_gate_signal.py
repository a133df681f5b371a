"""Would a gate spare the clean rows the trusted teacher gets wrong? (session 14's analysis; flags read here only.)

For finished cells made with `row_filter_teacher_mix` and the shallow probe, reads the saved per-row
`teacher_log_probs`, `shallow_log_probs` and the fold probes' losses, and prints, over the kept rows, how far each
rule would move the targets of the clean and of the poisoned rows: the mean of `mix * gate * (1 - p_teacher(label))`
(how much of its label's target a row loses), for the mix as trained (gate 1), for a gate on the shallow probe's
confidence in the label (`gate = p_shallow(label)`: mix only where the row's words claim its label), and for a
teacher averaged (in logits) with the last fold-probe step's out-of-fold prediction. Also each teacher's agreement
with the labels of the clean and of the poisoned rows. Two classes only (the probe losses give `p(label)` alone).

    python benchmarks/teacher_gate_signal.py runs-v3/s13-teacher-l4-m0.5-stylebkd-s0-refit/cells/stylebkd/*/seed0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from peft_musclelora.benchmark.data import load_records


def label_probability(log_probs: list[list[float]], labels: np.ndarray) -> np.ndarray:
    """`p(label)` of each row from its saved class log-probabilities."""
    return np.exp(np.array(log_probs)[np.arange(len(labels)), labels])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", type=Path, help="finished cells made with the teacher and shallow probe")
    for cell in parser.parse_args().cells:
        decisions = json.loads((cell / "row_filter.json").read_text())
        metrics = json.loads((cell / "metrics.json").read_text())
        train = load_records(metrics["data"]["train"]["source"])
        poisoned = np.array([record.poisoned for record in train.records])
        labels = np.array(train.labels)
        rows, mix = decisions["rows"], decisions["summary"]["teacher_mix"]
        kept = np.array([row["reason"] == "keep" for row in rows])
        teacher = label_probability([row["teacher_log_probs"] for row in rows], labels)
        shallow = label_probability([row["shallow_log_probs"] for row in rows], labels)
        probe = np.exp(-np.array([row["losses"][len(decisions["summary"]["probe_steps"]) - 1] for row in rows]))
        logit = np.log(teacher / (1 - teacher)) + np.log(probe / (1 - probe))
        ensemble = 1 / (1 + np.exp(-logit / 2))
        rules = {
            "teacher, as trained": (teacher, np.ones_like(teacher)),
            "teacher, gated by p_shallow(label)": (teacher, shallow),
            "teacher + fold probe (logit mean)": (ensemble, np.ones_like(teacher)),
        }
        report: dict = {"cell": str(cell), "mix": mix}
        for name, (p_label, gate) in rules.items():
            moved = mix * gate * (1 - p_label)
            report[name] = {
                "clean_agreement": round(float(np.mean(p_label[~poisoned] > 0.5)), 3),
                "clean_target_moved": round(float(moved[kept & ~poisoned].mean()), 3),
            } | (
                {
                    "poisoned_agreement": round(float(np.mean(p_label[poisoned] > 0.5)), 3),
                    "poisoned_target_moved": round(float(moved[kept & poisoned].mean()), 3),
                }
                if poisoned.any()
                else {}
            )
        print(json.dumps(report))


if __name__ == "__main__":
    main()
