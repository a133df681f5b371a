#!/usr/bin/env bash
# Session 15's expert-probe cells (docs/results.md): `fit-gap-unlearn` with the n-gram shallow expert at WEIGHT and
# the fold probes continued as a product of experts with it up to each of STEPS (`row_filter_expert_probe_steps`,
# comma-separated, each > 64), full size, one lane: run two lanes at once with different jobs on a 2-core machine.
# Each job is ATTACK:WEIGHT:STEPS[:SEED[:refit]] (seed 0 by default; "refit" sets row_filter_refit_bias=true); ATTACK
# "clean" trains on AddSent's unpoisoned train-clean.csv (the oracle's training set).
#   bash benchmarks/expert_probe.sh runs stylebkd:4:96,128 synbkd:4:96,128:0:refit
set -euo pipefail
out=${1:?usage: expert_probe.sh OUTPUT_ROOT ATTACK:WEIGHT:STEPS[:SEED[:refit]] ...}; shift
data=${MUSCLELORA_DATA:-../shared/data}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
for job in "$@"; do
  IFS=: read -r attack weight steps seed refit <<<"$job"
  seed=${seed:-0}
  refit=$([ "${refit:-}" = refit ] && echo true || echo false)
  name=s15-expert-l$weight-p${steps//,/-}-$attack-s$seed$([ "$refit" = true ] && echo "-refit" || echo "")
  common=(--set learning_rate=1e-3 --set row_filter_shallow_probe=ngram --set row_filter_shallow_expert=true
          --set "row_filter_shallow_expert_weight=$weight" --set "row_filter_expert_probe_steps=$steps"
          --set "row_filter_refit_bias=$refit" --quiet)
  if [ "$attack" = clean ]; then
    d=$data/sst-2/poison/addsent
    musclelora train --method fit-gap-unlearn --train "$d/train-clean.csv" --dev "$d/dev-clean.csv" \
      --test-clean "$d/test-clean.csv" --test-poison "$d/test-poison.csv" --seed "$seed" \
      --output-dir "$out/$name/addsent" "${common[@]}"
  else
    musclelora bench --attacks "$attack" --seeds "$seed" --methods fit-gap-unlearn --output-dir "$out/$name" "${common[@]}"
  fi
done
