#!/usr/bin/env bash
# The full-size cells of the shallow-expert weight (docs/results.md, "Session 10" and "Session 11"), one lane: run two
# lanes at once with different jobs on a 2-core machine. Each job is ATTACK:WEIGHT[:SEED[:LOSS[:balanced]]] (seed 0
# and the product of experts by default; LOSS is row_filter_shallow_expert_loss, "product" or "reweight"; "balanced"
# sets row_filter_shallow_expert_balanced); ATTACK "clean" trains on AddSent's unpoisoned train-clean.csv (the
# oracle's training set).
#   bash benchmarks/shallow_expert_weights.sh runs stylebkd:6 synbkd:6 clean:6
#   bash benchmarks/shallow_expert_weights.sh runs badnets:6:1 addsent:6:1
#   bash benchmarks/shallow_expert_weights.sh runs stylebkd:6:2:reweight stylebkd:6:2:product:balanced
set -euo pipefail
out=${1:?usage: shallow_expert_weights.sh OUTPUT_ROOT ATTACK:WEIGHT[:SEED] ...}; shift
data=${MUSCLELORA_DATA:-../shared/data}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
for job in "$@"; do
  IFS=: read -r attack weight seed loss balanced <<<"$job"
  seed=${seed:-0}
  loss=${loss:-product}
  balanced=$([ "${balanced:-}" = balanced ] && echo true || echo false)
  # Seed 0 and the product of experts keep session 10's directory names so its cells are reused, not retrained.
  suffix=$([ "$seed" = 0 ] && echo "" || echo "-s$seed")
  suffix=$suffix$([ "$loss" = product ] && echo "" || echo "-$loss")$([ "$balanced" = true ] && echo "-balanced" || echo "")
  common=(--set learning_rate=1e-3 --set row_filter_shallow_probe=ngram --set row_filter_shallow_expert=true
          --set "row_filter_shallow_expert_weight=$weight" --set "row_filter_shallow_expert_loss=$loss"
          --set "row_filter_shallow_expert_balanced=$balanced" --quiet)
  if [ "$attack" = clean ]; then
    d=$data/sst-2/poison/addsent
    musclelora train --method fit-gap-unlearn --train "$d/train-clean.csv" --dev "$d/dev-clean.csv" \
      --test-clean "$d/test-clean.csv" --test-poison "$d/test-poison.csv" --seed "$seed" \
      --output-dir "$out/s10-poe-l$weight-clean$suffix/addsent" "${common[@]}"
  else
    musclelora bench --attacks "$attack" --seeds "$seed" --methods fit-gap-unlearn \
      --output-dir "$out/s10-poe-l$weight-$attack$suffix" "${common[@]}"
  fi
done
