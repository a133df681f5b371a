"""Tiny models and datasets shared by the gradient-alignment and frequency tests and the two-process DDP script."""

from __future__ import annotations

import datasets
import torch
from transformers import BertConfig, BertForSequenceClassification

from peft_musclelora import MuScleLoraTrainingArguments

VOCAB, SEQ_LEN = 40, 8


def tiny_bert(seed: int = 0, dropout: float = 0.0) -> BertForSequenceClassification:
    """A 1-layer BERT classifier with hidden size 16, built from a config (no download)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ_LEN,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def token_dataset(rows: int, seed: int) -> datasets.Dataset:
    """Random token rows of fixed length with a learnable label (is token 1 present?)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (rows, SEQ_LEN), generator=generator)
    labels = torch.randint(0, 2, (rows,), generator=generator)
    input_ids[labels == 1, 0] = 1
    return datasets.Dataset.from_dict(
        {
            "input_ids": input_ids.tolist(),
            "attention_mask": torch.ones_like(input_ids).tolist(),
            "labels": labels.tolist(),
        }
    )


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def row_filter_training_args(tmp_path, **overrides):
    """Training arguments of a tiny row-filtered run (probe steps 2 and 4, 20 % clean-drop budget, no GA)."""
    settings = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "num_train_epochs": 1,
        "learning_rate": 1e-2,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "gradient_alignment": False,
        "row_filter": True,
        "row_filter_probe_steps": [2, 4],
        "row_filter_max_clean_drop": 0.2,
        "seed": 0,
    }
    settings.update(overrides)
    return MuScleLoraTrainingArguments(**settings)
