"""Shared tiny models for the tuner tests.

Every model is built from a config (hidden size 16, one layer) with a fixed seed, so two calls of the same factory
give bit-identical weights, and nothing is ever downloaded (models that must be loaded are saved to `tmp_path` first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import peft_musclelora  # noqa: F401  (registers the tuner with PEFT)

# The models are tiny: with several test runs sharing two cores, intra-op threads only spin against each other
# (a 16-wide forward measured 130 ms with two threads under load, 2 ms with one).
torch.set_num_threads(1)

SEED = 0
VOCAB_SIZE = 64
SEQ_LEN = 8
BATCH_SIZE = 2


@dataclass(frozen=True)
class TinyModelCase:
    """A tiny transformers model and how to adapt it.

    Args:
        name: Test id.
        build: Makes the model (seeded, eval mode).
        task_type: PEFT task type; SEQ_CLS makes PEFT train and save the head.
        target_modules: Modules to adapt.
        head: Name of the classification head (trained and saved as a module to save), None for causal LMs.
        conv1d: Whether the targets are GPT-2 `Conv1D` layers (`fan_in_fan_out=True`).
    """

    name: str
    build: Callable[[], PreTrainedModel]
    task_type: str
    target_modules: tuple[str, ...]
    head: str | None = None
    conv1d: bool = False

    def __str__(self) -> str:
        return self.name


def _seeded(model_cls: type[PreTrainedModel], config: object) -> Callable[[], PreTrainedModel]:
    def build() -> PreTrainedModel:
        torch.manual_seed(SEED)
        return model_cls(config).eval()

    return build


_BERT = BertConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
    num_labels=2,
)
_ROBERTA = RobertaConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=34,
    pad_token_id=1,
    num_labels=2,
)
_GPT2 = GPT2Config(
    vocab_size=VOCAB_SIZE,
    n_embd=16,
    n_layer=1,
    n_head=2,
    n_positions=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
    num_labels=2,
)
_LLAMA = LlamaConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=32,
    pad_token_id=0,
    num_labels=2,
)

MODEL_CASES: tuple[TinyModelCase, ...] = (
    TinyModelCase(
        "bert-seqcls", _seeded(BertForSequenceClassification, _BERT), "SEQ_CLS", ("query", "value"), "classifier"
    ),
    TinyModelCase(
        "roberta-seqcls",
        _seeded(RobertaForSequenceClassification, _ROBERTA),
        "SEQ_CLS",
        ("query", "value"),
        "classifier",
    ),
    TinyModelCase(
        "gpt2-seqcls", _seeded(GPT2ForSequenceClassification, _GPT2), "SEQ_CLS", ("c_attn", "c_fc"), "score", True
    ),
    TinyModelCase("gpt2-causal", _seeded(GPT2LMHeadModel, _GPT2), "CAUSAL_LM", ("c_attn", "c_fc"), None, True),
    TinyModelCase(
        "llama-seqcls",
        _seeded(LlamaForSequenceClassification, _LLAMA),
        "SEQ_CLS",
        ("q_proj", "v_proj", "down_proj"),
        "score",
    ),
    TinyModelCase(
        "llama-causal", _seeded(LlamaForCausalLM, _LLAMA), "CAUSAL_LM", ("q_proj", "v_proj", "down_proj"), None
    ),
)
MODEL_CASES_BY_NAME = {case.name: case for case in MODEL_CASES}


def make_inputs(seed: int = SEED) -> dict[str, torch.Tensor]:
    """A batch of token ids (no padding) for the tiny models."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB_SIZE, (BATCH_SIZE, SEQ_LEN), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of `model` on `inputs`, without building a graph."""
    with torch.no_grad():
        return model(**inputs).logits


class TwoLayerMLP(nn.Module):
    """A plain `nn.Linear` model for tests that need no transformers machinery."""

    def __init__(self, in_features: int = 16, hidden: int = 32, out_features: int = 8) -> None:
        super().__init__()
        self.lin0 = nn.Linear(in_features, hidden)
        self.lin1 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def make_mlp() -> TwoLayerMLP:
    torch.manual_seed(SEED)
    return TwoLayerMLP().eval()


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(SEED)


@pytest.fixture
def mlp_inputs() -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(SEED))
