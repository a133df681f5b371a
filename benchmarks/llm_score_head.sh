#!/usr/bin/env bash
# Where the multi-scale adapter sits on a Llama classifier (docs/llm.md): the reference's extra frozen
# dense -> dropout -> out_proj head with MSLR on `score.dense` (benchmarks/llm_bench.sh) against MSLR on the model's own
# frozen `score` layer, with everything else as in benchmarks/llm_bench.sh (same subsample, epochs, lr, seed).
# Usage: bash benchmarks/llm_score_head.sh MODEL_DIR [OUTPUT_DIR] [METHODS]
set -euo pipefail
model="${1:?usage: llm_score_head.sh MODEL_DIR [OUTPUT_DIR] [METHODS]}"
out="${2:-runs/llm-score-head}"
methods="${3:-musclelora-llama,lora-llama}"
export HF_HUB_OFFLINE=1
musclelora bench --model "$model" --load-in-4bit --attacks addsent,badnets --methods "$methods" \
    --seeds 0 --quiet --set max_train_rows=600 --set num_train_epochs=2 --set learning_rate=1e-3 \
    --set max_dev_rows=300 --set max_test_rows=400 --set classification_head=default \
    --set musclelora-llama.head_pattern=score --output-dir "$out"
