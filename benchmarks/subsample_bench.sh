#!/usr/bin/env bash
# The four-attack benchmark on a seeded 2000-row subsample (2 epochs) that fits a 2-core CPU: docs/results.md.
# Usage: bash benchmarks/subsample_bench.sh [OUTPUT_DIR]   (data: $MUSCLELORA_DATA or ../shared/data)
# Two `musclelora bench` invocations; each writes results.md, results.json, a bar chart and per-cell metrics.json.
# Re-running reuses finished cells. Set OMP_NUM_THREADS to share the machine with other work.
set -euo pipefail
out="${1:-runs/subsample-bench}"
export HF_HUB_OFFLINE=1
attacks=badnets,addsent,stylebkd,synbkd
# lr 1e-3: at the presets' 2e-4, 2000 rows x 2 epochs leave MiniLM near chance. ga-lora-tuned and clean-only take the
# same 400 seeded clean-dev rows as trusted rows and select checkpoints on the other 472; the methods without trusted
# rows (lora, oracle, zdefence) select on all 872.
common=(--attacks "$attacks" --seeds 0 --quiet --set max_train_rows=2000 --set learning_rate=1e-3
    --set reference_split_size=400)
# undefended LoRA, the tuned GA recipe, the oracle (LoRA on the unpoisoned rows) and Z-defence, in one run
# (same-run time ratios)
musclelora bench "${common[@]}" --set num_train_epochs=2 --methods lora,ga-lora-tuned,oracle,zdefence \
    --output-dir "$out/two-epochs"
# the baseline that discards the poisoned data: LoRA on the 400 trusted rows alone, its own 20 epochs
musclelora bench "${common[@]}" --methods clean-only --output-dir "$out/clean-only"
