#!/usr/bin/env bash
# ONION on the real data (docs/results.md): undefended LoRA and ONION (SmolLM2-135M scorer) on the same seeded
# subsample as benchmarks/subsample_bench.sh, screening a seeded 100 rows of each test set and calibrating on 100
# clean-dev rows: ONION scores (words + 1) sentences per row with a 135M LM, which the full test sets (2,733 rows)
# would take hours for on a 2-core CPU. Usage: bash benchmarks/onion_bench.sh [OUTPUT_DIR] [ATTACKS]
set -euo pipefail
out="${1:-runs/onion}"
attacks="${2:-badnets,addsent}"
export HF_HUB_OFFLINE=1
musclelora bench --attacks "$attacks" --seeds 0 --quiet --set max_train_rows=2000 --set learning_rate=1e-3 \
    --set num_train_epochs=2 --set max_dev_rows=100 --set max_test_rows=100 --methods lora,onion --no-plot \
    --output-dir "$out"
