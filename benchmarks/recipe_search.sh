#!/usr/bin/env bash
# Recipe search on the AddSent subsample (docs/results.md, "How the recipe was found"): what the classification head
# does under gradient alignment. Same subsample and gates as the GA study (2000 rows, 2 epochs, lr 1e-3, GA on every
# step, 400 references). Usage: bash benchmarks/recipe_search.sh [OUTPUT_DIR]
set -euo pipefail
out="${1:-runs/exp}"
export HF_HUB_OFFLINE=1
common=(--attacks addsent --seeds 0 --quiet --set max_train_rows=2000 --set num_train_epochs=2
    --set learning_rate=1e-3 --set ga_warmup_epochs=0 --set max_raw_grad_ratio=0 --set min_ref_loss=0
    --set reference_split_size=400 --no-plot)
# trainable classifier with its raw gradient; GA only on the LoRA factors
musclelora bench "${common[@]}" --set freeze_head=false --set ga_params=lora_ --methods ga-lora --output-dir "$out/headraw"
# trainable classifier, GA on every trainable tensor (what became ga-lora-tuned)
musclelora bench "${common[@]}" --set freeze_head=false --methods ga-lora --output-dir "$out/headga"
# the tuned recipe with subspace alignment: g projected onto the span of the last 8 reference gradients
musclelora bench --attacks addsent --seeds 0 --quiet --set max_train_rows=2000 --set num_train_epochs=2 \
    --set learning_rate=1e-3 --set reference_split_size=400 --no-plot --set ga_subspace_size=8 \
    --methods ga-lora-tuned --output-dir "$out/subspace8"
