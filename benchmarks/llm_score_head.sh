#!/usr/bin/env bash
# Where the multi-scale adapter sits on a Llama classifier (docs/llm.md): the reference's extra frozen
# dense -> dropout -> out_proj head with MSLR on `score.dense` (benchmarks/llm_bench.sh) against MSLR on the model's own
# frozen `score` layer: benchmarks/llm_bench.sh with the model's own head, everything else unchanged.
# Usage: bash benchmarks/llm_score_head.sh MODEL_DIR [OUTPUT_DIR]
set -euo pipefail
model="${1:?usage: llm_score_head.sh MODEL_DIR [OUTPUT_DIR]}"
out="${2:-runs/llm-score-head}"
bash "$(dirname "$0")/llm_bench.sh" "$model" "$out" --set classification_head=default \
    --set musclelora-llama.head_pattern=score
