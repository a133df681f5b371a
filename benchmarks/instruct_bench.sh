#!/usr/bin/env bash
# Instruction tuning with the defense (docs/llm.md): QLoRA vs QLoRA + MuScleLoRA (MSLR on down_proj + gradient
# alignment) on SmolLM2-135M-Instruct in NF4 with TRL's SFTTrainer, on the shared SST-2 attacks.
# A seeded 400-row subsample, 1 epoch (50 steps of 8) at lr 1e-3, 200 rows of each test set scored by the likelier
# label word; GA takes 64 clean-dev prompts as references (batches of 8). A cell whose metrics.json exists is kept
# (delete its directory to retrain).
# Variants: lora, musclelora (MSLR on down_proj + GA), ga-lora (LoRA + GA, no MSLR), mslr (MSLR, no GA),
# fit-gap (LoRA on the rows the row filter keeps; the 64 references are its trusted rows), fit-gap-unlearn (fit-gap,
# then the guarded unlearning of the fit-early rows), fit-gap-poe (fit-gap-unlearn with the n-gram shallow expert),
# fit-gap-gated (fit-gap-poe at weight 4 with the gated trusted teacher on the answer tokens), fit-gap-evidence
# (fit-gap-gated, trained plainly on strong isolation evidence), fit-gap-inserted (fit-gap-evidence whose unlearning
# phase also inserts the trigger into the kept prompts; the encoder's recommended defense),
# musclelora@MODULE (MSLR on MODULE + GA, e.g. musclelora@up_proj).
# Usage: bash benchmarks/instruct_bench.sh MODEL_DIR [OUTPUT_DIR] [ATTACKS] [VARIANTS]
set -euo pipefail
model="${1:?usage: instruct_bench.sh MODEL_DIR [OUTPUT_DIR] [ATTACKS] [VARIANTS]}"
out="${2:-runs/instruct}"
attacks="${3:-badnets,addsent}"
variants="${4:-lora,musclelora}"
data="${MUSCLELORA_DATA:-../shared/data}"
export HF_HUB_OFFLINE=1
for attack in ${attacks//,/ }; do
    d="$data/sst-2/poison/$attack"
    for variant in ${variants//,/ }; do
        case "$variant" in
            lora | musclelora | fit-gap | fit-gap-unlearn | fit-gap-poe | fit-gap-gated | fit-gap-evidence | fit-gap-inserted)
                method=(--method "$variant") ;;
            ga-lora) method=(--method lora --set gradient_alignment=true) ;;
            mslr) method=(--method musclelora --set gradient_alignment=false) ;;
            musclelora@*) method=(--method musclelora --set "mslr_target=${variant#musclelora@}") ;;
            *) echo "unknown variant $variant" >&2; exit 2 ;;
        esac
        cell="$out/$attack-${variant/@/-}"
        if [[ -f "$cell/metrics.json" ]]; then
            echo "keep $cell"
            continue
        fi
        musclelora instruct "${method[@]}" --model "$model" --load-in-4bit --train "$d/train-mixed-0.1.csv" \
            --dev "$d/dev-clean.csv" --test-clean "$d/test-clean.csv" --test-poison "$d/test-poison.csv" \
            --set max_train_rows=400 --set max_test_rows=200 --set learning_rate=1e-3 --set reference_split_size=64 \
            --set reference_batch_size=8 --quiet --output-dir "$cell"
    done
done
