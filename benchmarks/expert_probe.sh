#!/usr/bin/env bash
# Session 15's expert-probe cells (docs/results.md): `fit-gap-unlearn` with the n-gram shallow expert at WEIGHT and
# the fold probes continued as a product of experts with it up to each of STEPS (`row_filter_expert_probe_steps`,
# comma-separated, each > 64), full size, one lane each (benchmarks/fit_gap_cell.sh). Each job is
# ATTACK:WEIGHT:STEPS[:SEED[:refit]] (seed 0 by default; "refit" sets row_filter_refit_bias=true); ATTACK "clean"
# trains on AddSent's unpoisoned train-clean.csv.
#   bash benchmarks/expert_probe.sh runs stylebkd:4:96,128 synbkd:4:96,128:0:refit
set -euo pipefail
out=${1:?usage: expert_probe.sh OUTPUT_ROOT ATTACK:WEIGHT:STEPS[:SEED[:refit]] ...}; shift
here=$(dirname "$0")
for job in "$@"; do
  IFS=: read -r attack weight steps seed refit <<<"$job"
  refit=$([ "${refit:-}" = refit ] && echo true || echo false)
  bash "$here/fit_gap_cell.sh" "$out" "s15-expert-l$weight-p${steps//,/-}$([ "$refit" = true ] && echo -refit)" \
    "$attack" "${seed:-0}" --set row_filter_shallow_probe=ngram --set row_filter_shallow_expert=true \
    --set "row_filter_shallow_expert_weight=$weight" --set "row_filter_expert_probe_steps=$steps" \
    --set "row_filter_refit_bias=$refit"
done
