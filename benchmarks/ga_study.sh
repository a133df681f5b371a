#!/usr/bin/env bash
# Gradient-alignment study on one attack, on a seeded subsample that fits a 2-core CPU in under an hour.
# Usage: bash benchmarks/ga_study.sh [ATTACK] [OUTPUT_DIR]   (data: --data / $MUSCLELORA_DATA / ../shared/data)
# Each line is a `musclelora bench` invocation; its results.md and per-cell metrics.json land under OUTPUT_DIR.
set -euo pipefail
attack="${1:-addsent}"
out="${2:-runs/ga-study-$attack}"
export HF_HUB_OFFLINE=1
# lr 1e-3: at the preset's 2e-4, 2000 rows x 2 epochs leave MiniLM near chance (dev accuracy 0.51 after epoch 1).
common=(--attacks "$attack" --seeds 0 --quiet --set max_train_rows=2000 --set num_train_epochs=2 --set learning_rate=1e-3)
every_step=(--set ga_warmup_epochs=0 --set max_raw_grad_ratio=0 --set min_ref_loss=0)

musclelora bench "${common[@]}" --methods lora --output-dir "$out/undefended"
musclelora bench "${common[@]}" "${every_step[@]}" --methods ga-lora --output-dir "$out/every-step-96"
musclelora bench "${common[@]}" "${every_step[@]}" --set ga_every_n_steps=4 --methods ga-lora \
    --output-dir "$out/every-4th-step-96"
musclelora bench "${common[@]}" --methods musclelora --output-dir "$out/published"
musclelora bench "${common[@]}" "${every_step[@]}" --set reference_split_size=400 --methods ga-lora \
    --output-dir "$out/every-step-400"
