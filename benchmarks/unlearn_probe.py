"""Research probe for issue 20: unlearn the rows a finished `fit-gap` cell isolated as fitted early (ABL's action).

Loads a finished `fit-gap` cell (adapter + `row_filter.json`), then runs `--steps` AdamW steps that keep fitting the
trusted clean rows while pushing the isolated `fit-early` rows' loss up to `--cap` nats
(`loss = CE(trusted) + relu(cap - CE(isolated))`), and scores CACC / ASR / false-target rate before and after on the
cell's test files. One setting for every attack; nothing reads the poison flags.

    OMP_NUM_THREADS=1 python benchmarks/unlearn_probe.py runs/full-size-fitgap/cells/badnets/fit-gap/seed0 \
        --attack badnets
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from peft_musclelora.benchmark.data import SharedData, load_records
from peft_musclelora.benchmark.runner import load_cell, score
from peft_musclelora.benchmark.splits import split_trusted


def _batches(tokenizer, texts, labels, batch_size, generator):
    while True:
        order = torch.randperm(len(texts), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            encoded = tokenizer(
                [texts[i] for i in rows], truncation=True, max_length=64, padding=True, return_tensors="pt"
            )
            encoded["labels"] = torch.tensor([labels[i] for i in rows])
            yield encoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell")
    parser.add_argument("--attack", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--cap", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cell = Path(args.cell)
    decisions = json.loads((cell / "row_filter.json").read_text())
    isolated = [row for row in decisions["rows"] if row["reason"] == "fit-early"]
    files = SharedData.resolve().attack_files(args.attack)
    trusted, _ = split_trusted(load_records(files.dev), 400, args.seed)
    clean, poison = load_records(files.test_clean), load_records(files.test_poison)
    model, tokenizer, info = load_cell(cell / "adapter")
    before = score(model, tokenizer, clean, poison, info["target_label"], progress=False)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or "modules_to_save" in name
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    clean_batches = _batches(tokenizer, trusted.texts, trusted.labels, 32, generator)
    isolated_batches = _batches(
        tokenizer, [r["text"] for r in isolated], [r["label"] for r in isolated], 32, generator
    )
    model.train()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss_clean = model(**next(clean_batches)).loss
        loss_isolated = model(**next(isolated_batches)).loss
        loss = loss_clean + torch.relu(args.cap - loss_isolated)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    after = score(model, tokenizer, clean, poison, info["target_label"], progress=False)
    keys = ("cacc", "asr", "false_target_rate")
    print(
        json.dumps(
            {
                "attack": args.attack,
                "isolated_rows": len(isolated),
                "steps": args.steps,
                "lr": args.lr,
                "cap": args.cap,
                "before": {k: round(100 * before[k], 1) for k in keys},
                "after": {k: round(100 * after[k], 1) for k in keys},
                "unlearn_seconds": round(seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
