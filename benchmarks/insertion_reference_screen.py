"""What inserted words do to a backdoor-free model: a screen for the trigger-inserted unlearning target (session 25).

`row_filter_unlearn_target="trigger_inserted"` pulls a kept row with the trigger inserted to a *reference*
prediction. A backdoor-free model (the oracle) does not read BadNets' words as neutral: its ASR lies about 5 points
below its false-target rate. This script asks which reference reproduces that without a backdoor-free model: on
the non-target clean test rows of a finished cell, the share predicted as the target (the false-target rate) with
nothing inserted, with the attack's trigger tokens inserted, and with as many placebo tokens inserted at the same
places, for two placebo pools: tokens of the training rows about as common in the trusted rows as each trigger
token (`peft_musclelora.unlearning.placebo_tokens`), and tokens that no training or trusted row holds (words the
fine-tuning never saw, as BadNets' words are for the oracle). Token-level insertion
(`peft_musclelora.unlearning.insert_runs`), seeded; no training.

    python benchmarks/insertion_reference_screen.py --attack badnets runs-v6/s12-oracle-s3 \
        runs-v6/s25-unchanged-badnets-s0/cells/badnets/fit-gap-evidence/seed0
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from peft_musclelora.benchmark.builders import load_cell
from peft_musclelora.benchmark.data import load_records
from peft_musclelora.unlearning import apply_insertions, draw_insertions, placebo_tokens, with_placebos

TARGET_LABEL = 1
#: The trigger words of the shared attacks, as `benchmarks/isolated_trigger_tokens.py` reads them off the filter.
TRIGGERS = {"badnets": ["cf", "mn", "bb", "tq"], "addsent": ["i watch this 3d movie"]}


def _presence(tokenizer, texts: list[str]) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        counts.update(set(tokenizer(text)["input_ids"]))
    return counts


@torch.no_grad()
def _target_share(model, batches: list[dict]) -> float:
    predicted = torch.cat([model(**batch).logits.argmax(-1) for batch in batches])
    return 100 * float((predicted == TARGET_LABEL).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", type=Path, help="finished cells (their adapter/ directory is loaded)")
    parser.add_argument("--attack", required=True, choices=sorted(TRIGGERS))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    files = args.data / "sst-2" / "poison" / args.attack
    test = load_records(files / "test-clean.csv")
    texts = [record.text for record in test.records if record.label != TARGET_LABEL]
    training_texts = load_records(files / "train-mixed-0.1.csv").texts
    trusted_texts = load_records(files / "dev-clean.csv").texts
    for cell in args.cells:
        model, tokenizer, info = load_cell(cell / "adapter")
        model.eval()
        kept, trusted = _presence(tokenizer, training_texts), _presence(tokenizer, trusted_texts)
        runs = [tokenizer(words, add_special_tokens=False)["input_ids"] for words in TRIGGERS[args.attack]]
        trigger_ids = {token for run in runs for token in run}
        same_frequency = placebo_tokens(kept, trusted, trigger_ids, kept_rows=len(training_texts))
        special = set(tokenizer.all_special_ids)
        never_seen = [
            token
            for token in range(len(tokenizer))
            if token not in kept
            and token not in trusted
            and token not in special
            and not tokenizer.convert_ids_to_tokens(token).startswith("[")
        ]
        unseen = dict.fromkeys(trigger_ids, never_seen)
        generator = torch.Generator().manual_seed(args.seed)
        shares = {"nothing": [], "trigger": [], "placebo, as common": [], "placebo, never seen": []}
        for start in range(0, len(texts), 128):
            batch = tokenizer(
                texts[start : start + 128],
                padding=True,
                truncation=True,
                max_length=info["max_length"],
                return_tensors="pt",
            )
            batch = dict(batch)
            insertions = draw_insertions(batch["attention_mask"], [runs], generator, info["max_length"] + 16)
            shares["nothing"].append(batch)
            shares["trigger"].append(apply_insertions(batch, insertions, tokenizer.pad_token_id))
            for name, pool in (("placebo, as common", same_frequency), ("placebo, never seen", unseen)):
                placebo = with_placebos(insertions, pool, generator)
                shares[name].append(apply_insertions(batch, placebo, tokenizer.pad_token_id))
        row = " | ".join(f"{_target_share(model, batches):.1f}" for batches in shares.values())
        print(f"| {cell} | {row} |")
    print(f"columns: {', '.join(shares)} (share of {len(texts)} non-target test rows predicted as the target)")


if __name__ == "__main__":
    main()
