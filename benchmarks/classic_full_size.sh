#!/usr/bin/env bash
# Issue 20's same-run comparison at full size (session 12): undefended LoRA, the recommended defense and the classic
# defenses in one `musclelora bench` per attack, lr 1e-3 for every method (the rate of the LoRA and row-filter cells
# in docs/results.md), so the time ratio is measured in the same run. One lane; resumable (finished cells are
# reused). Usage: bash benchmarks/classic_full_size.sh OUTPUT_DIR ATTACK SEED METHODS
#   bash benchmarks/classic_full_size.sh runs/s12-classic addsent 0 lora,recommended,zdefence,rap,bki
set -euo pipefail
out=${1:?usage: classic_full_size.sh OUTPUT_DIR ATTACK SEED METHODS}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
musclelora bench --attacks "$2" --seeds "$3" --methods "$4" --quiet --output-dir "$out" --set learning_rate=1e-3
