#!/usr/bin/env bash
# Session 10's full-size cells of the shallow-expert weight (docs/results.md, "Session 10"), one lane: run two lanes
# at once with different jobs on a 2-core machine. Each job is ATTACK:WEIGHT; ATTACK "clean" trains on AddSent's
# unpoisoned train-clean.csv (the oracle's training set).
#   bash benchmarks/shallow_expert_weights.sh runs stylebkd:6 synbkd:6 clean:6
set -euo pipefail
out=${1:?usage: shallow_expert_weights.sh OUTPUT_ROOT ATTACK:WEIGHT ...}; shift
data=${MUSCLELORA_DATA:-../shared/data}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
for job in "$@"; do
  attack=${job%%:*}; weight=${job##*:}
  common=(--set learning_rate=1e-3 --set row_filter_shallow_probe=ngram --set row_filter_shallow_expert=true
          --set "row_filter_shallow_expert_weight=$weight" --quiet)
  if [ "$attack" = clean ]; then
    d=$data/sst-2/poison/addsent
    musclelora train --method fit-gap-unlearn --train "$d/train-clean.csv" --dev "$d/dev-clean.csv" \
      --test-clean "$d/test-clean.csv" --test-poison "$d/test-poison.csv" \
      --output-dir "$out/s10-poe-l$weight-clean/addsent" "${common[@]}"
  else
    musclelora bench --attacks "$attack" --seeds 0 --methods fit-gap-unlearn \
      --output-dir "$out/s10-poe-l$weight-$attack" "${common[@]}"
  fi
done
