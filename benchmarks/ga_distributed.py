"""Step-time cost of gradient alignment under DDP and FSDP2: two CPU processes (gloo), GA vs no GA, in one run.

Each engine trains the same BERT-from-config with the published MuScleLoRA recipe (LoRA on query/value, MSLR scales
1..9 on the pooler) in a minimal loop around `GradientAlignmentMixin`'s alignment step (the step the Trainer calls
before clipping; transformers' Trainer enables FSDP on accelerators only, so the loop is written out here). Per
engine three configurations run round-robin: no GA, GA every step, GA every 4th step; each repeat's time per
optimisation step is the mean over the measured steps (the slowest rank's), and the smallest mean over repeats is kept
to damp noise from other work on the machine. `align ms` is the time inside `align_gradients` per step: the per-tensor
sums, the FSDP2 all-reduce of all of them at once, and the local rescale; the rest of GA's cost is the reference
forward/backward. Ratios are to no GA under the same engine, in the same run.

    OMP_NUM_THREADS=1 python benchmarks/ga_distributed.py
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from typing import Any

import datasets
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification, default_data_collator

import peft_musclelora.trainer as ga_trainer
from peft_musclelora import MuScleLoraTrainer, MuScleLoraTrainingArguments
from peft_musclelora.config import bert_musclelora_config

CONFIGS = {"no GA": None, "GA every step": 1, "GA every 4th step": 4}
ENGINES = ("ddp", "fsdp2")


def random_rows(rows: int, seq_len: int, vocab: int, seed: int) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, seq_len), generator=generator)
    labels = torch.randint(0, 2, (rows,), generator=generator)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def build(engine: str, every: int | None, options: argparse.Namespace, output_dir: str) -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=options.hidden,
        num_hidden_layers=options.layers,
        num_attention_heads=4,
        intermediate_size=4 * options.hidden,
        max_position_embeddings=options.seq_len,
    )
    adapter = bert_musclelora_config(init_weights="kaiming")
    model = get_peft_model(BertForSequenceClassification(config), adapter)
    args = MuScleLoraTrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        per_device_train_batch_size=options.batch,
        max_steps=options.steps,
        report_to=[],
        save_strategy="no",
        ddp_backend="gloo",
        gradient_alignment=every is not None,
        ga_every_n_steps=every or 1,
    )
    rows = options.batch * dist.get_world_size() * options.steps
    trainer = MuScleLoraTrainer(
        model=model,
        args=args,
        train_dataset=random_rows(rows, options.seq_len, config.vocab_size, seed=1),
        reference_dataset=random_rows(4 * options.batch * dist.get_world_size(), options.seq_len, 1000, seed=2),
        data_collator=default_data_collator,
    )
    module = trainer.model
    if engine == "ddp":
        module = torch.nn.parallel.DistributedDataParallel(trainer.model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in trainer.model.base_model.model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(trainer.model)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    return trainer, module, optimizer


def timed_run(trainer: Any, module: Any, optimizer: Any, options: argparse.Namespace) -> tuple[float, float]:
    """Mean seconds per step and per `align_gradients` call over the measured steps, on this rank."""
    rank, world, batch = dist.get_rank(), dist.get_world_size(), options.batch
    spent = [0.0]

    def timed_align(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = original(*args, **kwargs)
        spent[0] += time.perf_counter() - start
        return result

    original, ga_trainer.align_gradients = ga_trainer.align_gradients, timed_align
    times = []
    try:
        for step in range(options.steps):
            if step == options.warmup:
                spent[0] = 0.0
            dist.barrier()
            start = time.perf_counter()
            first = (step * world + rank) * batch
            rows = [trainer.train_dataset[i] for i in range(first, first + batch)]
            inputs = trainer._prepare_inputs(default_data_collator(rows))
            trainer.compute_loss(module, inputs).backward()
            trainer.state.global_step = step
            trainer._maybe_align_gradients(module)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    finally:
        ga_trainer.align_gradients = original
    measured = times[options.warmup :]
    return sum(measured) / len(measured), spent[0] / len(measured)


def worker(rank: int, world: int, port: int, options: argparse.Namespace, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(options.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    best: dict[tuple[str, str], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for _ in range(options.repeats):
            for engine in ENGINES:
                for name, every in CONFIGS.items():
                    step, align = timed_run(*build(engine, every, options, output_dir), options)
                    # the slowest rank sets the step time
                    both = torch.tensor([step, align], dtype=torch.float64)
                    dist.all_reduce(both, op=dist.ReduceOp.MAX)
                    key = (engine, name)
                    if key not in best or both[0].item() < best[key][0]:
                        best[key] = (both[0].item(), both[1].item())
    if rank == 0:
        queue.put(best)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="rows per rank per step")
    parser.add_argument("--steps", type=int, default=10, help="optimisation steps per measurement, warm-up included")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    options = parser.parse_args()
    if not 0 <= options.warmup < options.steps:
        raise ValueError(f"`--warmup` must be in [0, --steps), got {options.warmup!r} with --steps {options.steps!r}.")
    if (options.steps - options.warmup) % 4:
        # the "every 4th step" row is only a fair average over whole cycles of 4
        raise ValueError(
            f"`--steps - --warmup` must be a multiple of 4, got {options.steps!r} - {options.warmup!r}; "
            "the defaults are 10 and 2."
        )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.spawn(worker, args=(2, port, options, queue), nprocs=2, join=True)
    best = queue.get()

    print(
        f"2 processes (gloo, CPU, {options.threads} thread each), BERT hidden {options.hidden} x {options.layers} "
        f"layers, seq {options.seq_len}, {options.batch} rows per rank, {options.steps - options.warmup} measured "
        f"steps, best of {options.repeats}"
    )
    print("| engine | configuration | ms/step | align ms/step | ratio to no GA |")
    print("|---|---|---|---|---|")
    for engine in ENGINES:
        base = best[(engine, "no GA")][0]
        for name in CONFIGS:
            step, align = best[(engine, name)]
            print(f"| {engine} | {name} | {1000 * step:.1f} | {1000 * align:.2f} | {step / base:.2f} |")


if __name__ == "__main__":
    main()
