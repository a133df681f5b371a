"""Train the tiny BERT with gradient alignment on two CPU processes (gloo); run by tests/test_gradient_alignment.py.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/ddp_ga_train.py OUTPUT_DIR
"""

import json
import os
import sys

import torch
from ga_helpers import tiny_bert, token_dataset
from safetensors.torch import save_file
from transformers import default_data_collator

from peft_musclelora import MuScleLoraTrainer, MuScleLoraTrainingArguments

if __name__ == "__main__":
    output_dir = sys.argv[1]
    args = MuScleLoraTrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=0.05,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        ddp_backend="gloo",
    )
    trainer = MuScleLoraTrainer(
        model=tiny_bert(),
        args=args,
        train_dataset=token_dataset(32, seed=1),
        reference_dataset=token_dataset(12, seed=2),
        data_collator=default_data_collator,
    )
    trainer.train()
    rank = int(os.environ["RANK"])
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(weights, f"{output_dir}/rank{rank}.safetensors")
    with open(f"{output_dir}/log{rank}.json", "w") as handle:
        json.dump(trainer.state.log_history, handle)
    # Left to interpreter shutdown, the gloo group's threads can abort the process ("terminate called without an
    # active exception") after training succeeded; tests/distributed_launch.py runs a run killed so once more.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
