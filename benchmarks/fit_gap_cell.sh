#!/usr/bin/env bash
# One full-size `fit-gap-unlearn` cell (lr 1e-3) with any row-filter settings, one lane (run two lanes at once with
# different cells on a 2-core machine). ATTACK "clean" trains on AddSent's unpoisoned train-clean.csv (the oracle's
# training set). Resumable: a finished cell is reused by the bench, and refused by `musclelora train` (a new NAME).
#   bash benchmarks/fit_gap_cell.sh OUTPUT_ROOT NAME ATTACK SEED [--set FIELD=VALUE ...]
#   bash benchmarks/fit_gap_cell.sh runs-v4 s15-residual-l4 stylebkd 0 --set row_filter_shallow_probe=ngram \
#       --set row_filter_shallow_expert=true --set row_filter_shallow_expert_weight=4 --set row_filter_shallow_residual=true
set -euo pipefail
out=${1:?usage: fit_gap_cell.sh OUTPUT_ROOT NAME ATTACK SEED [--set FIELD=VALUE ...]}
name=${2:?name}; attack=${3:?attack}; seed=${4:?seed}; shift 4
data=${MUSCLELORA_DATA:-../shared/data}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
common=(--set learning_rate=1e-3 "$@" --quiet)
if [ "$attack" = clean ]; then
  d=$data/sst-2/poison/addsent
  musclelora train --method fit-gap-unlearn --train "$d/train-clean.csv" --dev "$d/dev-clean.csv" \
    --test-clean "$d/test-clean.csv" --test-poison "$d/test-poison.csv" --seed "$seed" \
    --output-dir "$out/$name-clean-s$seed/addsent" "${common[@]}"
else
  musclelora bench --attacks "$attack" --seeds "$seed" --methods fit-gap-unlearn \
    --output-dir "$out/$name-$attack-s$seed" "${common[@]}"
fi
