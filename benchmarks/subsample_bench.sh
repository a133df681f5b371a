#!/usr/bin/env bash
# The full results table of docs/results.md: every method on the four attacks, on a seeded 2000-row subsample of
# each attack's training set (2 epochs) that fits a 2-core CPU.
# Usage: bash benchmarks/subsample_bench.sh [OUTPUT_DIR]   (data: $MUSCLELORA_DATA or ../shared/data)
# One `musclelora bench` invocation: results.md, results.json, a bar chart and per-cell metrics.json. Re-running
# reuses every finished cell trained with the same settings, so the table can be built in pieces (it was: see
# docs/results.md). Set OMP_NUM_THREADS to share the machine with other work.
set -euo pipefail
out="${1:-runs/subsample-bench/two-epochs}"
export HF_HUB_OFFLINE=1
# lr 1e-3: at the presets' 2e-4, 2000 rows x 2 epochs leave MiniLM near chance; full fine-tuning keeps its own 5e-5
# (1e-3 is a LoRA rate). Methods with trusted rows (the GA presets, clean-only) take the same 400 seeded clean-dev
# rows and select checkpoints on the other 472; the others select on all 872. clean-only trains its own 20 epochs.
methods=lora,full,mslr,musclelora,ga-lora,ga-lora-tuned,clean-only,oracle,zdefence,bki,cube,strip,rap
musclelora bench --attacks badnets,addsent,stylebkd,synbkd --seeds 0 --quiet --set max_train_rows=2000 \
    --set learning_rate=1e-3 --set reference_split_size=400 --set num_train_epochs=2 --set full.learning_rate=5e-5 \
    --methods "$methods" --output-dir "$out"
