"""Research probe for issue 20: unlearn the rows a finished `fit-gap` cell isolated (ABL's action), with a guard.

Loads a finished `fit-gap` cell (adapter + `row_filter.json`), splits the trusted clean-dev rows into a fitting half
and a guard half (the benchmark's seeded split), then runs `--steps` AdamW steps that keep fitting the fitting half
while pushing the isolated rows' loss up to `--cap` nats (`loss = CE(fit) + relu(cap - CE(isolated))`; `--cap
chance` is ln K: the isolated rows are pushed to chance, not to the other class). Every `--eval-every` steps it
records the guard half's accuracy and loss and, for the report only, CACC / ASR on a fixed subsample of the test
files. The guard rule keeps the last recorded state whose guard accuracy is at most `--guard-drop` below the start;
both that state and the last one are scored on the full test files. Nothing reads the poison flags.

    OMP_NUM_THREADS=1 python benchmarks/unlearn_probe.py runs/full-size-fitgap/cells/badnets/fit-gap/seed0 \
        --attack badnets --cap chance --isolate fit-early
"""

from __future__ import annotations

import argparse
import json
import math
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


@torch.no_grad()
def _accuracy_and_loss(model, tokenizer, texts, labels):
    model.eval()
    losses, right = [], 0
    for start in range(0, len(texts), 64):
        encoded = tokenizer(
            texts[start : start + 64], truncation=True, max_length=64, padding=True, return_tensors="pt"
        )
        target = torch.tensor(labels[start : start + 64])
        logits = model(**encoded).logits.float()
        losses.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
        right += int((logits.argmax(-1) == target).sum())
    model.train()
    return right / len(texts), float(torch.cat(losses).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell")
    parser.add_argument("--attack", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cap", default="chance", help="nats, or `chance` (ln of the number of labels)")
    parser.add_argument("--isolate", choices=("fit-early", "flagged"), default="fit-early")
    parser.add_argument(
        "--fit",
        choices=("trusted", "kept"),
        default="trusted",
        help="what the fitting term trains on: half the trusted rows (the other half guards), or the rows the filter "
        "kept (all trusted rows guard)",
    )
    parser.add_argument("--guard-drop", type=float, default=0.01)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--trusted", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cell = Path(args.cell)
    decisions = json.loads((cell / "row_filter.json").read_text())
    reasons = ("fit-early",) if args.isolate == "fit-early" else ("fit-early", "contradicted")
    isolated = [row for row in decisions["rows"] if row["reason"] in reasons]
    files = SharedData.resolve().attack_files(args.attack)
    trusted, _ = split_trusted(load_records(files.dev), args.trusted, args.seed)
    if args.fit == "trusted":
        fit, guard = split_trusted(trusted, args.trusted // 2, args.seed + 1)
        fit_texts, fit_labels = fit.texts, fit.labels
    else:
        guard = trusted
        kept = [row for row in decisions["rows"] if row["reason"] == "keep"]
        fit_texts, fit_labels = [r["text"] for r in kept], [r["label"] for r in kept]
    clean, poison = load_records(files.test_clean), load_records(files.test_poison)
    clean_small, poison_small = clean.subsample(400, args.seed), poison.subsample(300, args.seed)
    model, tokenizer, info = load_cell(cell / "adapter")
    target = info["target_label"]
    cap = math.log(info["num_labels"]) if args.cap == "chance" else float(args.cap)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or "modules_to_save" in name
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    fit_batches = _batches(tokenizer, fit_texts, fit_labels, 32, generator)
    isolated_texts, isolated_labels = [r["text"] for r in isolated], [r["label"] for r in isolated]
    isolated_batches = _batches(tokenizer, isolated_texts, isolated_labels, 32, generator)

    def record(step):
        guard_acc, guard_loss = _accuracy_and_loss(model, tokenizer, guard.texts, guard.labels)
        _, isolated_loss = _accuracy_and_loss(model, tokenizer, isolated_texts, isolated_labels)
        small = score(model, tokenizer, clean_small, poison_small, target, progress=False)
        point = {
            "step": step,
            "guard_acc": round(100 * guard_acc, 1),
            "guard_loss": round(guard_loss, 3),
            "isolated_loss": round(isolated_loss, 3),
            "cacc_sub": round(100 * small["cacc"], 1),
            "asr_sub": round(100 * small["asr"], 1),
        }
        print(json.dumps(point), flush=True)
        return point, [p.detach().clone() for p in params]

    trajectory, states = [], []
    point, state = record(0)
    trajectory.append(point)
    states.append(state)
    model.train()
    seconds = 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        loss = model(**next(fit_batches)).loss + torch.relu(cap - model(**next(isolated_batches)).loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        seconds += time.perf_counter() - start
        if step % args.eval_every == 0:
            point, state = record(step)
            trajectory.append(point)
            states.append(state)
    floor = trajectory[0]["guard_acc"] - 100 * args.guard_drop
    chosen = max(i for i, p in enumerate(trajectory) if p["guard_acc"] >= floor)
    keys = ("cacc", "asr", "false_target_rate")
    results = {}
    for label, index in (("last", len(states) - 1), ("guarded", chosen), ("before", 0)):
        with torch.no_grad():
            for param, value in zip(params, states[index]):
                param.copy_(value)
        metrics = score(model, tokenizer, clean, poison, target, progress=False)
        results[label] = {"step": trajectory[index]["step"], **{k: round(100 * metrics[k], 1) for k in keys}}
    print(
        json.dumps(
            {
                "attack": args.attack,
                "isolate": args.isolate,
                "fit": args.fit,
                "isolated_rows": len(isolated),
                "cap": round(cap, 3),
                "lr": args.lr,
                "steps": args.steps,
                "guard_drop": args.guard_drop,
                **results,
                "unlearn_seconds": round(seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
