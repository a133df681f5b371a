"""A minimal training loop around `GradientAlignmentMixin`'s alignment step: one process, DDP or FSDP2 (gloo, CPU).

transformers' Trainer only enables FSDP on accelerators, so the distributed tests drive the mixin's own entry point
(`_maybe_align_gradients`, what the Trainer calls before clipping) from this loop, with `fully_shard` applied here.
Every mode sees the same global batches and the same global reference rows: a distributed rank takes its slice of
each global micro-batch, the single process the whole of it. The model runs in float64, so the 1e-6 relative
agreement the tests ask for has many orders of magnitude of margin over rounding; any error in the reductions
shows up at order 1.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_ga_train.py OUTPUT_DIR

runs every case of `CASES` under DDP and under FSDP2, plus a checkpoint/resume of the FSDP2 run and the refusals
that need a process group; tests/test_distributed_ga.py runs the single-process reference in its own process with
`run_case("single", ...)` and compares.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import default_data_collator

import peft_musclelora.trainer as ga_trainer
from peft_musclelora import MuScleLoraConfig, MuScleLoraTrainer, MuScleLoraTrainingArguments, align_gradients
from tests.ga_helpers import tiny_bert, token_dataset

WORLD = 2  # the distributed runs use two processes; the single run takes WORLD ranks' rows at once
PER_RANK_BATCH, PER_RANK_REFS = 2, 4
# Each case: GA arguments, steps, gradient-accumulation steps. Together they reach every branch of align_gradients.
CASES: dict[str, dict[str, Any]] = {
    "aligned": {"ga": {}, "steps": 3, "accumulation": 1},
    "accumulation": {"ga": {}, "steps": 2, "accumulation": 2},
    "subspace": {"ga": {"ga_subspace_size": 2, "ga_every_n_steps": 2}, "steps": 4, "accumulation": 1},
    "mixed": {"ga": {"min_ref_loss": 1e9, "max_raw_grad_ratio": 0.5}, "steps": 2, "accumulation": 1},
    "zero": {"ga": {"min_ref_loss": 1e9, "ga_fallback": "zero"}, "steps": 2, "accumulation": 1},
    "ga_params": {"ga": {"ga_params": "classifier"}, "steps": 2, "accumulation": 1},
}
KEY_SEPARATOR = "|"  # weights{rank}.safetensors holds "RUN|PARAMETER" for every run ("fsdp2/aligned") and weight
RESUME_CASE, RESUME_AFTER = "subspace", 3  # step 3 reuses the reference gradient cached at step 2


def build(mode: str, case: str, output_dir: str) -> tuple[MuScleLoraTrainer, torch.nn.Module, torch.optim.Optimizer]:
    """The trainer, the module to call (DDP wrapper, FSDP2-sharded model or the model) and an AdamW over it."""
    spec = CASES[case]
    ranks = 1 if mode == "single" else WORLD
    per_device = PER_RANK_BATCH * (WORLD // ranks)
    args = MuScleLoraTrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=spec["accumulation"],
        reference_batch_size=PER_RANK_REFS * (WORLD // ranks),
        max_steps=spec["steps"],
        report_to=[],
        save_strategy="no",
        ddp_backend="gloo" if mode != "single" else None,
        **spec["ga"],
    )
    # An odd number of scales (3 x rank 1) makes the adapter's A shards uneven across the two ranks (2 rows and 1).
    config = MuScleLoraConfig(
        task_type="SEQ_CLS", r=1, lora_alpha=2, target_modules=["query", "value"], scales=[1, 2, 4], init_weights=False
    )
    model = get_peft_model(tiny_bert(), config).double()
    trainer = MuScleLoraTrainer(
        model=model,
        args=args,
        train_dataset=token_dataset(64, seed=1),
        reference_dataset=token_dataset(24, seed=2),
        data_collator=default_data_collator,
    )
    module: torch.nn.Module = trainer.model
    if mode == "ddp":
        module = torch.nn.parallel.DistributedDataParallel(trainer.model)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in trainer.model.base_model.model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(trainer.model)
    elif mode == "fsdp1":  # only to check that it is refused
        from torch.distributed.fsdp import FullyShardedDataParallel

        module = FullyShardedDataParallel(trainer.model, device_id=torch.device("cpu"), use_orig_params=True)
    # no weight decay: under the zero fallback nothing may move, which the tests check
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    return trainer, module, optimizer


def train_steps(
    trainer: MuScleLoraTrainer, module: torch.nn.Module, optimizer: torch.optim.Optimizer, start: int, stop: int
) -> None:
    """Optimisation steps `start..stop-1`: accumulated backward, the mixin's alignment step, AdamW; logs each."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    ranks = dist.get_world_size() if dist.is_initialized() else 1
    accumulation, per_device = trainer.args.gradient_accumulation_steps, trainer.args.per_device_train_batch_size
    rows = trainer.train_dataset
    trainer.state.num_train_epochs = 1.0
    for step in range(start, stop):
        total = 0.0
        for micro in range(accumulation):
            first = (step * accumulation + micro) * per_device * ranks + rank * per_device
            batch = default_data_collator([rows[i] for i in range(first, first + per_device)])
            inputs = trainer._prepare_inputs(batch)
            loss = trainer.compute_loss(module, inputs) / accumulation
            loss.backward()
            total += float(loss.detach())
        trainer.state.global_step, trainer.state.epoch = step, step / trainer.args.max_steps
        trainer._maybe_align_gradients(module)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.log({"loss": total})  # flushes the step's ga/* statistics into log_history, as the Trainer does


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable weights, gathered whole (a test-side check; the training path never gathers)."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = param.detach()
            out[name] = (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()
    return out


def run_case(mode: str, case: str, output_dir: str) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Train one case from scratch; returns the final trainable weights and the logged history."""
    trainer, module, optimizer = build(mode, case, output_dir)
    train_steps(trainer, module, optimizer, 0, CASES[case]["steps"])
    return full_weights(trainer.model), trainer.state.log_history


def run_resumed(output_dir: str) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """FSDP2: train RESUME_AFTER steps, save sharded (torch.distributed.checkpoint), rebuild everything, resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoint = os.path.join(output_dir, "checkpoint")
    trainer, module, optimizer = build("fsdp2", RESUME_CASE, output_dir)
    train_steps(trainer, module, optimizer, 0, RESUME_AFTER)
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(checkpoint, "weights"))
    trainer.save_gradient_alignment_state(checkpoint)
    del trainer, module, optimizer

    trainer, module, optimizer = build("fsdp2", RESUME_CASE, output_dir)
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=os.path.join(checkpoint, "weights"))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer.load_gradient_alignment_state(checkpoint)
    train_steps(trainer, module, optimizer, RESUME_AFTER, CASES[RESUME_CASE]["steps"])
    return full_weights(trainer.model), trainer.state.log_history


def collectives_per_alignment(output_dir: str) -> list[dict[str, int]]:
    """The collectives each FSDP2 `align_gradients` call issues (counted by DTensor's CommDebugMode)."""
    from torch.distributed.tensor.debug import CommDebugMode

    counts: list[dict[str, int]] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        with CommDebugMode() as comm:
            result = align_gradients(*args, **kwargs)
        counts.append({str(op): n for op, n in comm.get_comm_counts().items()})
        return result

    original, ga_trainer.align_gradients = ga_trainer.align_gradients, counted
    try:
        trainer, module, optimizer = build("fsdp2", "subspace", output_dir)
        train_steps(trainer, module, optimizer, 0, 2)
    finally:
        ga_trainer.align_gradients = original
    return counts


def refusals(output_dir: str) -> dict[str, str]:
    """The errors the sharded path must raise, as `{what: message}` (an empty message: nothing was raised)."""
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sharded = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
    plain = torch.ones(4, 2)
    partial = DTensor.from_local(torch.ones(4, 2), mesh, [Partial()])  # an unreduced gradient
    attempts = {
        "mixed_plain_and_sharded": lambda: align_gradients([sharded, plain], [sharded, plain]),
        "reference_not_sharded": lambda: align_gradients([sharded], [plain]),
        "partial_gradient": lambda: align_gradients([partial], [partial]),
        "fsdp1": lambda: train_steps(*build("fsdp1", "aligned", output_dir), 0, 1),
    }
    messages = {}
    for what, attempt in attempts.items():
        try:
            attempt()
            messages[what] = ""
        except ValueError as error:
            messages[what] = str(error)
    return messages


if __name__ == "__main__":
    output_dir = sys.argv[1]
    results: dict[str, Any] = {}
    for mode in ("ddp", "fsdp2"):
        for case in CASES:
            results[f"{mode}/{case}"] = run_case(mode, case, output_dir)
    results["fsdp2/resumed"] = run_resumed(output_dir)
    rank = dist.get_rank()
    flat = {f"{key}{KEY_SEPARATOR}{name}": tensor for key, (run, _) in results.items() for name, tensor in run.items()}
    save_file(flat, f"{output_dir}/weights{rank}.safetensors")
    report = {
        "logs": {key: log for key, (_, log) in results.items()},
        "collectives": collectives_per_alignment(output_dir),
        "refusals": refusals(output_dir),
    }
    with open(f"{output_dir}/report{rank}.json", "w") as handle:
        json.dump(report, handle)
    # Tear the group down here, not at interpreter shutdown, where gloo's threads can abort a finished run.
    dist.barrier()
    dist.destroy_process_group()
