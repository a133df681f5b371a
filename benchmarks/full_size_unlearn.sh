#!/usr/bin/env bash
# Issue 20, full size, one seed: fit-gap-unlearn on the four attacks (and LoRA on BadNets in the same run, for the
# time ratio), then on the unpoisoned training set. Two lanes, one process and one thread each (a 2-core CPU);
# resumable: a finished cell is reused. As run for docs/results.md (from a snapshot of the repository at commit
# 6887c76, whose library and preset code this script's commit still has).
#   bash benchmarks/full_size_unlearn.sh [RUNS_DIR] [SEED]
set -euo pipefail
R=${1:-runs}
SEED=${2:-0}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
D=${MUSCLELORA_DATA:-../shared/data}/sst-2/poison/addsent
bench() { musclelora bench --seeds "$SEED" --quiet --set learning_rate=1e-3 "$@"; }
lane_a() {
  bench --attacks badnets --methods lora,fit-gap-unlearn --output-dir "$R/full-size-unlearn-a" > "$R/unlearn-a-badnets.log" 2>&1
  bench --attacks stylebkd --methods fit-gap-unlearn --output-dir "$R/full-size-unlearn-a" > "$R/unlearn-a-stylebkd.log" 2>&1
}
lane_b() {
  bench --attacks addsent --methods fit-gap-unlearn --output-dir "$R/full-size-unlearn-b" > "$R/unlearn-b-addsent.log" 2>&1
  bench --attacks synbkd --methods fit-gap-unlearn --output-dir "$R/full-size-unlearn-b" > "$R/unlearn-b-synbkd.log" 2>&1
  musclelora train --method fit-gap-unlearn --train "$D/train-clean.csv" --dev "$D/dev-clean.csv" \
    --test-clean "$D/test-clean.csv" --test-poison "$D/test-poison.csv" --seed "$SEED" \
    --output-dir "$R/full-size-unlearn-clean/addsent" --quiet > "$R/unlearn-b-clean.log" 2>&1
}
mkdir -p "$R"
lane_a & lane_b & wait
