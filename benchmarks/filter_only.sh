#!/usr/bin/env bash
# The row filter's decisions alone, without the training after it: runs one full-size `musclelora bench` cell of
# METHOD (lr 1e-3) with any settings, copies the `row_filter.json` the trainer writes once the probes (and the
# teacher, if the method has one) are done to OUTPUT/row_filter.json, and stops the cell there. Read it with
# `benchmarks/row_filter_report.py OUTPUT/row_filter.json --train TRAIN_FILE` (per-step AUROCs; flags read there
# only). Used to screen a signal of the filter (session 34: the probes under MSLR's scales) at the cost of the
# filter alone; the stopped cell's folder (OUTPUT/bench) is removed. An OUTPUT that already holds row_filter.json
# is left as it is (delete it to screen again).
#   bash benchmarks/filter_only.sh OUTPUT METHOD ATTACK SEED [--set FIELD=VALUE ...]
#   bash benchmarks/filter_only.sh runs-v6/s34-mslr-probe-stylebkd-s0 fit-gap stylebkd 0 \
#       --set kind=musclelora --set head_pattern=pooler.dense --set head_init=zero
set -euo pipefail
out=${1:?usage: filter_only.sh OUTPUT METHOD ATTACK SEED [--set FIELD=VALUE ...]}
method=${2:?method}; attack=${3:?attack}; seed=${4:?seed}; shift 4
if [ -e "$out/row_filter.json" ]; then
  echo "$out/row_filter.json exists: left as it is" >&2
  exit 0
fi
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
# A stopped cell leaves its `.partial-*` folder behind: start from an empty one, or an earlier screen's decisions
# would be found and copied at once.
rm -rf "$out/bench"
mkdir -p "$out"
musclelora bench --attacks "$attack" --seeds "$seed" --methods "$method" --output-dir "$out/bench" \
  --set learning_rate=1e-3 "$@" --quiet --no-plot > "$out/bench.log" 2>&1 &
cell=$!
trap 'kill "$cell" 2>/dev/null || true' EXIT  # one Python process: the bench's loaders run in it
while kill -0 "$cell" 2>/dev/null; do
  found=$(find "$out/bench" -path '*/.partial-*' -name row_filter.json 2>/dev/null | head -n 1 || true)
  if [ -n "$found" ]; then
    sleep 2  # written atomically (os.replace), so a found file is whole; the pause only lets the log catch up
    cp "$found" "$out/row_filter.json.tmp" && mv "$out/row_filter.json.tmp" "$out/row_filter.json"
    kill "$cell" 2>/dev/null || true
    wait "$cell" 2>/dev/null || true
    rm -rf "$out/bench"
    echo "decisions copied to $out/row_filter.json; the cell is stopped" >&2
    exit 0
  fi
  sleep 5
done
echo "the cell ended before the filter wrote its decisions: see $out/bench.log" >&2
exit 1
