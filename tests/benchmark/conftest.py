"""Fixtures of the benchmark tests: a tiny offline BERT and small OpenBackdoor-layout files."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

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
