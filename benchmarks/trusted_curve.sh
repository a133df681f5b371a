#!/usr/bin/env bash
# The trusted-data curve of docs/results.md: ga-lora-tuned vs clean-only as the number of trusted clean rows grows,
# on the same 2000-row subsample / lr 1e-3 as benchmarks/subsample_bench.sh (GA: 2 epochs; clean-only: its own 20).
# Usage: bash benchmarks/trusted_curve.sh [OUTPUT_DIR] [ATTACKS] [SIZES]
set -euo pipefail
out="${1:-runs/trusted-curve}"
attacks="${2:-addsent,badnets}"
sizes="${3:-96,400,800}"
export HF_HUB_OFFLINE=1
musclelora curve --attacks "$attacks" --sizes "$sizes" --methods ga-lora-tuned,clean-only --seeds 0 --quiet \
    --set max_train_rows=2000 --set learning_rate=1e-3 --set num_train_epochs=2 --output-dir "$out"
