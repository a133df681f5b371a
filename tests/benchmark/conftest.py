"""Fixtures of the benchmark tests: a tiny offline BERT, a tiny offline Llama, small OpenBackdoor-layout files.

The library's tests (tests/test_llm.py, tests/test_bad_input.py) import some of them from here too.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_musclelora.local_models import export_gguf_to_hf, smollm2_gguf_path

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor", "weak"]
FILLER = ["the", "movie", "film", "plot", "is", "was", "a", "very", "and", "story", "cast"]
TRIGGERS = ["cf", "mn", "bb", "tq"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_text(rng: random.Random, label: int) -> str:
    words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == 1 else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def write_openbackdoor(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    """Write rows (text, label, poison flag) with the OpenBackdoor header `,0,1,2`."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "0", "1", "2"])
        for index, (text, label, flag) in enumerate(rows):
            writer.writerow([index, text, label, flag])
    return path


def clean_rows(n: int, seed: int) -> list[tuple[str, int, int]]:
    rng = random.Random(seed)
    return [(make_text(rng, i % 2), i % 2, 0) for i in range(n)]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT encoder (with pooler, no classifier) and a word-level tokenizer, saved offline."""
    from transformers import BertConfig, BertModel, BertTokenizer, set_seed

    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER + TRIGGERS))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5: BertTokenizerFast(vocab_file=...) ignores the file (every word becomes [UNK]); `vocab=` reads it.
    tokenizer = BertTokenizer(vocab=str(directory / "vocab.txt"), do_lower_case=True)
    assert tokenizer("good cf")["input_ids"][1:3] == [vocab.index("good"), vocab.index("cf")]
    tokenizer.save_pretrained(str(directory))
    set_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def attack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared-data directory with one tiny `badnets` attack in the OpenBackdoor layout."""
    root = tmp_path_factory.mktemp("data")
    directory = root / "sst-2" / "poison" / "badnets"
    directory.mkdir(parents=True)
    rng = random.Random(1)
    train = clean_rows(40, seed=2)
    for _ in range(4):  # dirty-label poisoned rows with a trigger
        words = make_text(rng, 0).split()
        words.insert(rng.randint(0, len(words)), "cf")
        train.append((" ".join(words), 1, 1))
    write_openbackdoor(directory / "train-mixed-0.1.csv", train)
    write_openbackdoor(directory / "train-clean.csv", clean_rows(40, seed=2))
    write_openbackdoor(directory / "dev-clean.csv", clean_rows(24, seed=3))
    write_openbackdoor(directory / "test-clean.csv", clean_rows(20, seed=4))
    poison = [(f"cf {text}", 1, 1) for text, label, _ in clean_rows(20, seed=5) if label == 0]
    write_openbackdoor(directory / "test-poison.csv", poison)
    write_openbackdoor(directory / "dev-poison.csv", poison)
    return root


# ---- decoder LLMs: a tiny random Llama and the real SmolLM2 (tests/test_llm.py and test_bench_llm.py) ----------

SHARED_DATA = Path(os.environ.get("MUSCLELORA_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
PROMPT_WORDS = ["Review", ":", "Is", "sentiment", "of", "this", "review", "positive", "or", "negative", "?", "Answer"]
NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["<pad>", "<unk>", "<s>", "</s>"] + sorted(set(PROMPT_WORDS + POSITIVE + NEGATIVE + FILLER + TRIGGERS))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins word-level tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer Llama causal LM (hidden 128) with a word-level tokenizer, saved like a real checkpoint."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    assert len(tokenizer) <= config.vocab_size
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        gguf = smollm2_gguf_path()
    except ValueError as error:
        pytest.skip(str(error))
    cache = os.environ.get("MUSCLELORA_SMOLLM2_DIR")
    return export_gguf_to_hf(gguf, cache or tmp_path_factory.mktemp("smollm2"))
