#!/usr/bin/env bash
# The oracle (undefended LoRA at lr 1e-3 on the unpoisoned training set, which no defender has) at more seeds, full
# size: trained once per seed on train-clean.csv (the four attacks share it byte for byte) and evaluated on every
# attack's test sets, so the excess ASR of a defense can be taken seed by seed. One lane; resumable (a finished
# seed is not retrained, a written evaluation is not replaced).
#   bash benchmarks/oracle_seeds.sh runs 1 2
set -euo pipefail
out=${1:?usage: oracle_seeds.sh OUTPUT_ROOT SEED ...}; shift
data=${MUSCLELORA_DATA:-../shared/data}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
clean=$data/sst-2/poison/addsent
for seed in "$@"; do
  cell=$out/s12-oracle-s$seed
  if [ ! -f "$cell/metrics.json" ]; then
    musclelora train --method lora --train "$clean/train-clean.csv" --dev "$clean/dev-clean.csv" \
      --test-clean "$clean/test-clean.csv" --test-poison "$clean/test-poison.csv" --seed "$seed" \
      --set learning_rate=1e-3 --quiet --output-dir "$cell"
  fi
  for attack in badnets addsent stylebkd synbkd; do
    [ -f "$cell/eval-$attack.json" ] || musclelora eval --adapter "$cell/adapter" --attack "$attack" --quiet \
      --output "$cell/eval-$attack.json"
  done
done
