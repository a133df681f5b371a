#!/usr/bin/env bash
# Issue 20, session 8: `fit-gap-unlearn` with the evidence test (unlearning only when the training rows are isolated
# more often than the trusted rows) and length-sorted scoring. Full size, one seed: BadNets (where the test should
# pass; with undefended LoRA in the same run for the time ratio) and StyleBkd (where session 7's unlearning raised
# the ASR); then the instruction-tuning path (SmolLM2-135M in NF4, `benchmarks/instruct_bench.sh` settings) on
# BadNets, QLoRA and fit-gap-unlearn side by side. Two lanes, one process and one thread each (a 2-core CPU);
# resumable: a finished cell is reused.
#   bash benchmarks/full_size_gate.sh [RUNS_DIR] [SEED] [SMOLLM2_DIR]   (the model: musclelora export-model --smollm2)
set -euo pipefail
R=${1:-runs}
SEED=${2:-0}
MODEL=${3:-models/smollm2-135m}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
bench() { musclelora bench --seeds "$SEED" --quiet --set learning_rate=1e-3 --no-plot "$@"; }
lane_a() {
  bench --attacks badnets --methods lora --output-dir "$R/full-size-gate-a" > "$R/gate-a-badnets.log" 2>&1
  bench --attacks stylebkd --methods fit-gap-unlearn --output-dir "$R/full-size-gate-a" > "$R/gate-a-stylebkd.log" 2>&1
  bash benchmarks/instruct_bench.sh "$MODEL" "$R/instruct-gate" badnets lora > "$R/gate-a-instruct.log" 2>&1
}
lane_b() {
  bench --attacks badnets --methods fit-gap-unlearn --output-dir "$R/full-size-gate-b" > "$R/gate-b-badnets.log" 2>&1
  bash benchmarks/instruct_bench.sh "$MODEL" "$R/instruct-gate" badnets fit-gap-unlearn > "$R/gate-b-instruct.log" 2>&1
}
mkdir -p "$R"
lane_a & lane_b & wait
