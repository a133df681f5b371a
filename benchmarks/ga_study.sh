#!/usr/bin/env bash
# Gradient-alignment study on a seeded 2000-row subsample that fits a 2-core CPU: the numbers of docs/results.md.
# Usage: bash benchmarks/ga_study.sh [OUTPUT_DIR]   (data: $MUSCLELORA_DATA or ../shared/data)
# Each line is one `musclelora bench` invocation; its results.md and per-cell metrics.json land under OUTPUT_DIR.
# Re-running reuses finished cells (a cell is reused only with the same overrides, in the same order).
set -euo pipefail
out="${1:-runs/ga-study}"
export HF_HUB_OFFLINE=1
# lr 1e-3: at the preset's 2e-4, 2000 rows x 2 epochs leave MiniLM near chance (dev accuracy 0.51 after epoch 1).
# reference_dropout=true: the study ran before the reference pass dropped dropout by default (reproduces its cells).
common=(--seeds 0 --quiet --set reference_dropout=true --set max_train_rows=2000 --set num_train_epochs=2 --set learning_rate=1e-3)
# clean-only keeps its own 20 epochs: it trains on the trusted rows alone.
clean_only=(--seeds 0 --quiet --set max_train_rows=2000 --set learning_rate=1e-3)
every_step=(--set ga_warmup_epochs=0 --set max_raw_grad_ratio=0 --set min_ref_loss=0)

for attack in addsent badnets; do
    a=(--attacks "$attack")
    # undefended LoRA and GA on every step with 400 trusted rows, in one run (same-run time ratio)
    musclelora bench "${a[@]}" "${common[@]}" "${every_step[@]}" --set reference_split_size=400 \
        --methods lora,ga-lora --output-dir "$out/$attack/every-step-400"
    # the paper's recipe as published: MSLR on the pooler + GA with 96 references and the published gates
    musclelora bench "${a[@]}" "${common[@]}" --methods musclelora --output-dir "$out/$attack/published"
    # the baseline that discards the poisoned data: LoRA on the same 400 trusted rows alone
    musclelora bench "${a[@]}" "${clean_only[@]}" --set reference_split_size=400 --methods clean-only \
        --output-dir "$out/$attack/clean-only-400"
done

# AddSent only: a 96-row pool, GA every 4th step, and the multi-scale adapter with GA on every step.
a=(--attacks addsent)
musclelora bench "${a[@]}" "${common[@]}" "${every_step[@]}" --methods ga-lora --output-dir "$out/addsent/every-step-96"
musclelora bench "${a[@]}" "${common[@]}" "${every_step[@]}" --set ga_every_n_steps=4 --methods ga-lora \
    --output-dir "$out/addsent/every-4th-step-96"
musclelora bench "${a[@]}" "${common[@]}" "${every_step[@]}" --set reference_split_size=400 --methods musclelora \
    --output-dir "$out/addsent/musclelora-every-step-400"
musclelora bench "${a[@]}" "${clean_only[@]}" --set reference_split_size=96 --methods clean-only \
    --output-dir "$out/addsent/clean-only-96"
