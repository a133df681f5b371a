#!/usr/bin/env bash
# Moderate fitting (Zhu et al., NeurIPS 2022) at full size, session 12: does a shorter run learn the clean task but
# not a paraphrase backdoor, which the fit-gap probes show is learned late? Each job is METHOD:ATTACK:EPOCHS[:SEED]
# (lr 1e-3, the row filters' rate); one lane, resumable (a finished cell is reused).
#   bash benchmarks/moderate_fitting.sh runs lora:stylebkd:1 lora:synbkd:1
set -euo pipefail
out=${1:?usage: moderate_fitting.sh OUTPUT_ROOT METHOD:ATTACK:EPOCHS[:SEED] ...}; shift
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
for job in "$@"; do
  IFS=: read -r method attack epochs seed <<<"$job"
  seed=${seed:-0}
  musclelora bench --attacks "$attack" --seeds "$seed" --methods "$method" --quiet \
    --output-dir "$out/s12-epochs$epochs" --set learning_rate=1e-3 --set "num_train_epochs=$epochs"
done
