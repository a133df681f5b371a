"""Research probe for issue 20: which per-row training signals separate poisoned rows from clean ones.

For one attack of the shared data it trains undefended LoRA (the `lora` preset, lr 1e-3 by default) for a few
hundred steps on the full poisoned training set and records, at several steps, every training row's p(label) and
the same for the trusted rows (which are never trained on). It also trains LoRA on the trusted rows alone and
scores every training row with it. It prints, per signal, the AUROC against the poison flags (read for the report
only) and the share of clean / poisoned rows a trusted-calibrated cut-off would remove, and writes every row's
signals to `OUT/<attack>.json`.

    OMP_NUM_THREADS=1 python benchmarks/row_signals.py --attack badnets --output-dir runs/signals
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from peft_musclelora.benchmark.data import SharedData, load_records
from peft_musclelora.benchmark.methods import get_preset
from peft_musclelora.benchmark.runner import build_model, default_model_dir
from peft_musclelora.benchmark.splits import split_trusted


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive row > score of a negative row), ties counted half."""
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks over ties
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def encode(tokenizer, texts: list[str], max_length: int) -> list[dict[str, torch.Tensor]]:
    return [tokenizer(text, truncation=True, max_length=max_length) for text in texts]


def batches(encoded, labels, indices, batch_size, tokenizer):
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        features = tokenizer.pad([encoded[i] for i in chunk], return_tensors="pt")
        features["labels"] = torch.tensor([labels[i] for i in chunk])
        yield chunk, features


@torch.no_grad()
def p_label(model, encoded, labels, tokenizer, batch_size=128) -> np.ndarray:
    model.eval()
    out = np.empty(len(labels))
    for chunk, features in batches(encoded, labels, list(range(len(labels))), batch_size, tokenizer):
        target = features.pop("labels")
        probs = model(**features).logits.float().softmax(-1)
        out[chunk] = probs[torch.arange(len(chunk)), target].numpy()
    model.train()
    return out


def train_steps(model, encoded, labels, tokenizer, steps, lr, seed, batch_size=32, on_step=None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    done = 0
    model.train()
    while done < steps:
        order = torch.randperm(len(labels), generator=generator).tolist()
        for _, features in batches(encoded, labels, order, batch_size, tokenizer):
            loss = model(**features).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if on_step is not None:
                on_step(done)
            if done >= steps:
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", required=True)
    parser.add_argument("--output-dir", default="runs/signals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", default="8,16,32,64,128")
    parser.add_argument("--trusted", type=int, default=400)
    parser.add_argument("--max-train-rows", type=int, default=None)
    parser.add_argument("--clean-only-steps", type=int, default=250)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = SharedData.resolve()
    files = data.attack_files(args.attack)
    train = load_records(files.train).subsample(args.max_train_rows, args.seed)
    trusted, _ = split_trusted(load_records(files.dev), args.trusted, args.seed)
    flags = np.array([r.poisoned for r in train.records])
    preset = get_preset("lora")
    snapshots = sorted(int(s) for s in args.steps.split(","))

    model, tokenizer, _ = build_model(preset, default_model_dir(), 2, args.seed)
    enc_train = encode(tokenizer, train.texts, 64)
    enc_trusted = encode(tokenizer, trusted.texts, 64)
    signals: dict[str, list[float]] = {}
    start = time.perf_counter()
    signals["train@0"] = p_label(model, enc_train, train.labels, tokenizer).tolist()
    signals["trusted@0"] = p_label(model, enc_trusted, trusted.labels, tokenizer).tolist()

    def on_step(step: int) -> None:
        if step in snapshots:
            signals[f"train@{step}"] = p_label(model, enc_train, train.labels, tokenizer).tolist()
            signals[f"trusted@{step}"] = p_label(model, enc_trusted, trusted.labels, tokenizer).tolist()
            print(f"step {step}: {time.perf_counter() - start:.0f}s", flush=True)

    train_steps(model, enc_train, train.labels, tokenizer, max(snapshots), args.lr, args.seed, on_step=on_step)

    clean_model, _, _ = build_model(preset, default_model_dir(), 2, args.seed)
    train_steps(clean_model, enc_trusted, trusted.labels, tokenizer, args.clean_only_steps, args.lr, args.seed)
    signals["clean_only_train"] = p_label(clean_model, enc_train, train.labels, tokenizer).tolist()
    print(f"clean-only done: {time.perf_counter() - start:.0f}s", flush=True)

    labels = np.array(train.labels)
    report = {"attack": args.attack, "rows": len(labels), "poisoned": int(flags.sum()), "signals": {}}
    for name, values in signals.items():
        if not name.startswith("train@") and name != "clean_only_train":
            continue
        values = np.array(values)
        report["signals"][name] = {"auroc_high_is_poison": round(auroc(values, flags), 4)}
        print(f"{args.attack} {name}: AUROC(high p(label) = poisoned) {auroc(values, flags):.3f}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        **report,
        "labels": labels.tolist(),
        "trusted_labels": trusted.labels,
        "poisoned_flags": flags.astype(int).tolist(),
        "values": signals,
    }
    (out / f"{args.attack}.json").write_text(json.dumps(payload))


if __name__ == "__main__":
    main()
