"""Cost of each classic defense as a ratio to undefended LoRA training, measured in the same run.

Undefended LoRA (the `lora` preset) is trained once on a seeded subsample of one attack's poisoned training set;
then each defense runs as a bench cell on the same subsample ([`run_method`]), reusing that LoRA model where it
needs one (`bki`, `cube` and the detectors). Reported per defense, in seconds and as a multiple of the LoRA
training time:

* total — what the defense costs end to end: the undefended training it needs + its own work + retraining;
* own work — scoring / clustering / fitting on dev and screening the test sets (detectors screen every test row:
  their cost grows with the test set, the filters' with the training set);
* retrain — LoRA on the rows a filter kept.

A small subsample is the point (the machine this was written on has 2 shared cores): the ratios, not the seconds,
carry over, and only roughly — a defense that scores every word of every row (BKI, ONION) grows with sentence length
and row count, LoRA training with rows x epochs. Output: a Markdown table on stdout, and `cost.json`.

Run: `python benchmarks/defense_cost.py --data ../shared/data --attack badnets --train-rows 480 --dev-rows 128
--test-rows 100 --epochs 1 [--methods zdefence,bki,cube,strip,rap,onion] [--set onion.batch_size=64]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from peft_musclelora.benchmark.data import SharedData
from peft_musclelora.benchmark.methods import CellContext, get_method
from peft_musclelora.benchmark.overrides import parse_set_items
from peft_musclelora.benchmark.runner import train_cell
from peft_musclelora.benchmark.spec import resolve_cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="Shared data dir (default: $MUSCLELORA_DATA, ../shared/data)")
    parser.add_argument("--attack", default="badnets")
    parser.add_argument("--methods", default="zdefence,bki,cube,strip,rap,onion")
    parser.add_argument("--model", default=None, help="Local model dir (default MiniLM-L6)")
    parser.add_argument("--train-rows", type=int, default=480)
    parser.add_argument("--dev-rows", type=int, default=128)
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", default=None, help="Default: a temporary directory")
    args = parser.parse_args()

    files = SharedData.resolve(args.data).attack_files(args.attack)
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="defense-cost-"))
    overrides = [
        f"max_train_rows={args.train_rows}",
        f"max_dev_rows={args.dev_rows}",
        f"max_test_rows={args.test_rows}",
        f"num_train_epochs={args.epochs}",
        *args.overrides,
    ]
    items = parse_set_items(overrides)
    start = time.perf_counter()
    lora = train_cell(
        "lora",
        files.train,
        files.dev,
        out / "lora",
        model_dir=args.model,
        seed=args.seed,
        overrides=items.common,
        test_clean=files.test_clean,
        test_poison=files.test_poison,
        progress=False,
    )
    lora_wall = time.perf_counter() - start
    base = float(lora["train_time_s"])
    rows: list[dict[str, Any]] = [
        {"method": "lora", "total_s": base, "own_s": None, "retrain_s": None, "cacc": lora["cacc"], "asr": lora["asr"]}
    ]
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        try:
            context = CellContext(
                resolve_cell(method, items),
                files,
                out / method,
                model_dir=args.model,
                seed=args.seed,
                progress=False,
                extra={"method": method},
                undefended=lambda: lora,
            )
            metrics = get_method(method).run(context)
        except ValueError as error:
            rows.append({"method": method, "error": str(error)})
            continue
        rows.append(
            {
                "method": method,
                "total_s": metrics["train_time_s"],
                "own_s": metrics.get("defense_time_s"),
                "retrain_s": metrics.get("retrain_time_s"),
                "cacc": metrics["cacc"],
                "asr": metrics["asr"],
            }
        )
    print(
        f"# Defense cost, attack {args.attack}: {args.train_rows} train / {args.dev_rows} dev / {args.test_rows} rows "
        f"of each test set, {args.epochs:g} epoch(s), seed {args.seed}; LoRA training {base:.1f} s "
        f"({lora_wall:.1f} s with loading and scoring)\n"
    )
    print("| method | total (s) | total / LoRA | own work (s) | own / LoRA | retrain (s) | CACC | ASR |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['method']} | n/a: {row['error']} | | | | | | |")
            continue
        own = "–" if row["own_s"] is None else f"{row['own_s']:.1f}"
        own_ratio = "–" if row["own_s"] is None else f"{row['own_s'] / base:.2f}"
        retrain = "–" if row["retrain_s"] is None else f"{row['retrain_s']:.1f}"
        print(
            f"| {row['method']} | {row['total_s']:.1f} | {row['total_s'] / base:.2f} | {own} | {own_ratio} | "
            f"{retrain} | {100 * row['cacc']:.1f} | {100 * row['asr']:.1f} |"
        )
    (out / "cost.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
