#!/usr/bin/env bash
# Seed spread of the headline rows (docs/results.md): undefended LoRA and ga-lora-tuned over seeds 0, 1, 2 on the four
# attacks, with the settings of benchmarks/subsample_bench.sh. Usage: bash benchmarks/seed_spread.sh [OUTPUT_DIR]
set -euo pipefail
out="${1:-runs/seed-spread}"
export HF_HUB_OFFLINE=1
musclelora bench --attacks badnets,stylebkd,synbkd,addsent --seeds 0,1,2 --quiet --set max_train_rows=2000 \
    --set learning_rate=1e-3 --set reference_split_size=400 --set num_train_epochs=2 --methods lora,ga-lora-tuned \
    --no-plot --output-dir "$out"
