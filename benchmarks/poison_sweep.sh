#!/usr/bin/env bash
# Issue 18: undefended LoRA and the `recommended` defense on the shared SST-2 poisoned by `musclelora poison` at
# rates 1/5/10/20 %, dirty-label and clean-label, BadNets and AddSent with triggers other than the published ones.
# Setting of docs/results.md's subsample table: a seeded 2000-row subsample of each training set, 2 epochs,
# lr 1e-3, 400 trusted clean-dev rows, full test sets, seed 0. Two lanes, one process and one thread each (a
# 2-core CPU); resumable: `musclelora bench` reuses every finished cell.
#   bash benchmarks/poison_sweep.sh [RUNS_DIR]        (clean source: $MUSCLELORA_DATA or ../shared/data, sst-2/raw)
# Then: python benchmarks/poison_sweep_report.py [RUNS_DIR]   (the table of docs/results.md)
set -euo pipefail
R=${1:-runs/poison-sweep}
RAW=${MUSCLELORA_DATA:-../shared/data}/sst-2/raw
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
TRIGGERS=jz,xq,vw,kp                      # published BadNets: cf,mn,bb,tq
SENTENCE="my neighbour saw it last weekend"  # published AddSent: I watch this 3D movie
RATES=(0.01 0.05 0.1 0.2)
poison() {  # rate attack mode
  local out="$R/data/sst2-r$1/poison/$2-$3" extra=()
  [ "$3" = clean ] && extra+=(--clean-label)
  if [ "$2" = badnets ]; then extra+=(--triggers "$TRIGGERS"); else extra+=(--sentence "$SENTENCE"); fi
  [ -f "$out/poison.json" ] || musclelora poison --train "$RAW/train.tsv" --dev "$RAW/dev.tsv" --test "$RAW/test.tsv" \
    --output-dir "$out" --attack "$2" --poison-rate "$1" --seed 0 "${extra[@]}"
}
for rate in "${RATES[@]}"; do for attack in badnets addsent; do for mode in dirty clean; do
  poison "$rate" "$attack" "$mode"
done; done; done
# The oracle trains on train-clean.csv and is scored on test-poison.csv; both are the same bytes at every rate and
# in both modes (the clean source, triggered non-target rows), so one oracle per trigger serves the 8 cells.
sha256sum "$R"/data/sst2-r*/poison/*/{train-clean,test-poison}.csv | sort | awk '{print $1, $2}' > "$R/hashes.txt"
bench() {
  musclelora bench --data "$R/data" --seeds 0 --quiet --set max_train_rows=2000 --set learning_rate=1e-3 \
    --set reference_split_size=400 --set num_train_epochs=2 --no-plot "$@"
}
attacks=badnets-dirty,badnets-clean,addsent-dirty,addsent-clean
lane() {  # first rate, second rate, oracle attack
  for rate in "$1" "$2"; do
    bench --task "sst2-r$rate" --attacks "$attacks" --methods lora,recommended --output-dir "$R/cells/r$rate" \
      > "$R/bench-r$rate.log" 2>&1
  done
  bench --task sst2-r0.1 --attacks "$3" --methods oracle --output-dir "$R/cells/oracle" > "$R/bench-oracle-$3.log" 2>&1
}
mkdir -p "$R"
lane 0.01 0.1 badnets-dirty & lane 0.05 0.2 addsent-dirty & wait
