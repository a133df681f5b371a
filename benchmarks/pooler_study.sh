#!/usr/bin/env bash
# Why the multi-scale adapter on the pooler hurts the published recipe on MiniLM (docs/results.md): the published
# `musclelora` (gates + MSLR on pooler.dense), the same without MSLR (`ga-lora`), and `musclelora` with the pooler's
# MSLR factors initialised like LoRA (B = 0, so the adapter starts as the identity) on the full table's subsample.
# Each cell's log_history.json holds the gradient-alignment branch shares per epoch.
# Usage: bash benchmarks/pooler_study.sh [OUTPUT_DIR] [ATTACKS]
set -euo pipefail
out="${1:-runs/pooler-study}"
attacks="${2:-badnets}"
data="${MUSCLELORA_DATA:-../shared/data}"
export HF_HUB_OFFLINE=1
common=(--seed 0 --quiet --set max_train_rows=2000 --set learning_rate=1e-3 --set reference_split_size=400
    --set num_train_epochs=2)
for attack in ${attacks//,/ }; do
    d="$data/sst-2/poison/$attack"
    files=(--train "$d/train-mixed-0.1.csv" --dev "$d/dev-clean.csv" --test-clean "$d/test-clean.csv"
        --test-poison "$d/test-poison.csv")
    for variant in musclelora ga-lora musclelora-zero-head; do
        cell="$out/$attack/$variant"
        [[ -f "$cell/metrics.json" ]] && { echo "keep $cell"; continue; }
        extra=()
        method="$variant"
        if [[ "$variant" == musclelora-zero-head ]]; then
            method=musclelora
            extra=(--set head_init=zero)
        fi
        musclelora train --method "$method" "${files[@]}" "${common[@]}" "${extra[@]}" --output-dir "$cell"
    done
done
