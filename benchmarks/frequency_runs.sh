#!/usr/bin/env bash
# The frequency-analysis runs and figures of docs/frequency.md: undefended LoRA vs MuScleLoRA (the published recipe)
# on the shared SST-2 AddSent and BadNets sets, on the same 2000-row subsample / 2 epochs / lr 1e-3 as
# docs/results.md. Usage: bash benchmarks/frequency_runs.sh [RUNS_DIR] [FIGURES_DIR]
set -euo pipefail
runs="${1:-runs/frequency}"
figures="${2:-docs/figures}"
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
for attack in addsent badnets; do
    for method in lora musclelora; do
        if [ ! -f "$runs/$attack-$method/frequency_log.json" ]; then
            musclelora analyze --method "$method" --attack "$attack" --max-train-rows 2000 --epochs 2 \
                --learning-rate 1e-3 --every-n-steps 6 --samples 300 --seed 0 --output-dir "$runs/$attack-$method" \
                --figures-dir "$figures"
        fi
    done
    musclelora analyze --log "$runs/$attack-lora" --label "$attack-lora" --compare-log "$runs/$attack-musclelora" \
        --compare-label "$attack-musclelora" --figures-dir "$figures"
done
# AddSent: undefended LoRA vs this project's recipe (ga-lora-tuned: GA on every step, 400 trusted rows)
if [ ! -f "$runs/addsent-ga-lora-tuned/frequency_log.json" ]; then
    musclelora analyze --method ga-lora-tuned --attack addsent --max-train-rows 2000 --epochs 2 --learning-rate 1e-3 \
        --every-n-steps 6 --samples 300 --seed 0 --output-dir "$runs/addsent-ga-lora-tuned" --figures-dir "$figures"
fi
musclelora analyze --log "$runs/addsent-lora" --label addsent-lora --compare-log "$runs/addsent-ga-lora-tuned" \
    --compare-label addsent-ga-lora-tuned --figures-dir "$figures"
