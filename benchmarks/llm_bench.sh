#!/usr/bin/env bash
# QLoRA vs QLoRA + MuScleLoRA on SmolLM2-135M-Instruct in NF4 (the Llama-2 stand-in), classification path, on the
# shared SST-2 AddSent and BadNets sets: the numbers of docs/llm.md.
# Usage: bash benchmarks/llm_bench.sh MODEL_DIR [OUTPUT_DIR] [MORE BENCH OPTIONS...]
# (MODEL_DIR: `musclelora export-model --smollm2`; later --set items override the ones below)
# A seeded 600-row subsample, 2 epochs (76 steps of 16) at lr 1e-3: the published lr 1e-5 is tuned for 6920 rows x
# 5 epochs on a 7B model and leaves the 135M model at chance in this budget. Everything else is the preset
# (LoRA r 2 / alpha 8 on q_proj,v_proj; frozen dense->dropout->out head; musclelora-llama adds MSLR scales 1..4 on
# score.dense and GA on every step with 128 clean-dev references).
set -euo pipefail
model="${1:?usage: llm_bench.sh MODEL_DIR [OUTPUT_DIR] [MORE BENCH OPTIONS...]}"
out="${2:-runs/llm-bench}"
export HF_HUB_OFFLINE=1
musclelora bench --model "$model" --load-in-4bit --attacks addsent,badnets --methods lora-llama,musclelora-llama \
    --seeds 0 --quiet --set max_train_rows=600 --set num_train_epochs=2 --set learning_rate=1e-3 \
    --set max_dev_rows=300 --set max_test_rows=400 --output-dir "$out" "${@:3}"
