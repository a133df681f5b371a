#!/usr/bin/env bash
# The full-size bench (docs/results.md): the method presets unchanged (whole training set, 6,920 rows; 3 epochs;
# lr 2e-4), default headline methods. Resumable: a finished cell is reused, so it can be run one attack at a time.
# Usage: bash benchmarks/full_size.sh [OUTPUT_DIR] [ATTACKS] [SEEDS] [METHODS] [extra bench options, e.g. --set K=V]
set -euo pipefail
out="${1:-runs/full-size}"
attacks="${2:-badnets,addsent,stylebkd,synbkd}"
seeds="${3:-0,1,2}"
methods="${4:-lora,ga-lora-tuned}"
export HF_HUB_OFFLINE=1
musclelora bench --attacks "$attacks" --seeds "$seeds" --methods "$methods" --quiet --output-dir "$out" "${@:5}"
