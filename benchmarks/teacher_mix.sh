#!/usr/bin/env bash
# Session 13's trusted-teacher cells (docs/results.md): `fit-gap-unlearn` with the n-gram shallow expert at WEIGHT and
# each kept row's target mixed with a teacher trained on the trusted rows alone (`row_filter_teacher_mix`), full size,
# one lane: run two lanes at once with different jobs on a 2-core machine. Each job is ATTACK:WEIGHT:MIX[:SEED[:refit]]
# (seed 0 by default; "refit" sets row_filter_refit_bias=true); ATTACK "clean" trains on AddSent's unpoisoned
# train-clean.csv (the oracle's training set).
#   bash benchmarks/teacher_mix.sh runs stylebkd:4:0.5 synbkd:4:0.5 badnets:4:0.5:0:refit
set -euo pipefail
out=${1:?usage: teacher_mix.sh OUTPUT_ROOT ATTACK:WEIGHT:MIX[:SEED[:refit]] ...}; shift
data=${MUSCLELORA_DATA:-../shared/data}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
for job in "$@"; do
  IFS=: read -r attack weight mix seed refit <<<"$job"
  seed=${seed:-0}
  refit=$([ "${refit:-}" = refit ] && echo true || echo false)
  name=s13-teacher-l$weight-m$mix-$attack-s$seed$([ "$refit" = true ] && echo "-refit" || echo "")
  common=(--set learning_rate=1e-3 --set row_filter_shallow_probe=ngram --set row_filter_shallow_expert=true
          --set "row_filter_shallow_expert_weight=$weight" --set "row_filter_teacher_mix=$mix"
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
