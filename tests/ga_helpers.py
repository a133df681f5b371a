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


def tiny_llama(hidden: int = 16, vocab: int = 32):
    """A random one-layer Llama causal LM (pad 0, end-of-sequence 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tiny_tokenizer(vocab: int = 32):
    """A word-level tokenizer of `tiny_llama`'s vocabulary (`<pad>`, `<eos>`, `<unk>`, `w3`...)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tokenizer = Tokenizer(WordLevel(words, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def cue_answer_rows(count: int, seed: int) -> datasets.Dataset:
    """Prompt-completion rows for TRL (`input_ids`, `completion_mask`): a random token and a cue token (20 or 21, by
    the row's parity) that names the one-token answer (10 or 11), then end-of-sequence (1)."""
    generator = torch.Generator().manual_seed(seed)
    prompts, masks = [], []
    for row in range(count):
        cue, answer = (20, 10) if row % 2 else (21, 11)
        prompt = [int(torch.randint(3, 10, (1,), generator=generator)), cue]
        prompts.append([*prompt, answer, 1])
        masks.append([0] * len(prompt) + [1, 1])
    return datasets.Dataset.from_dict({"input_ids": prompts, "completion_mask": masks})


def assert_filter_leaves_state_as_found(trainer) -> dict:
    """Run the row filter of `trainer` and assert that every trainable weight and torch's random state are as before;
    returns the filter's report."""
    from peft_musclelora.row_filter import run_row_filter

    before, rng = trainable_state(trainer.model), torch.random.get_rng_state()
    report = run_row_filter(trainer, trainer.row_filter_args, trainer.reference_dataset, seed=0, progress=False)
    after = trainable_state(trainer.model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(rng, torch.random.get_rng_state())
    return report


def cue_answer_sft_trainer(tmp_path, train_rows: int = 128, **fields):
    """A `MuScleLoraSFTTrainer` on [`cue_answer_rows`] (a tiny Llama, completion-only loss, 10 trusted rows split from
    12 eval rows, which TRL prepares like the training set) with the n-gram shallow expert and `fields` on top."""
    from peft_musclelora import MuScleLoraSFTConfig, MuScleLoraSFTTrainer

    settings = {
        "output_dir": str(tmp_path), "max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True,
        "report_to": [], "save_strategy": "no", "max_length": 16, "bf16": False, "gradient_alignment": False,
        "row_filter": True, "row_filter_probe_steps": [1], "row_filter_max_clean_drop": 0.3,
        "row_filter_shallow_probe": "ngram", "row_filter_shallow_expert": True, "completion_only_loss": True,
        "reference_split_size": 10,
    }  # fmt: skip
    return MuScleLoraSFTTrainer(
        model=tiny_llama(),
        args=MuScleLoraSFTConfig(**{**settings, **fields}),
        train_dataset=cue_answer_rows(train_rows, seed=1),
        eval_dataset=cue_answer_rows(12, seed=2),
        processing_class=tiny_tokenizer(),
    )
