"""Write a small synthetic four-class topic dataset (clean train/dev/test CSV files), for `docs/benchmark.md`'s
"Your own data" walk-through. Nothing is downloaded.

Each row is a short sentence built from a topic's words and common filler words, with the topic's name as a string
label in the `topic` column (`business`, `science`, `sports`, `travel`); the classes are balanced and the rows
seeded, so the same `--seed` writes the same files.

    python examples/four_topics.py --output-dir my-topics/clean
    musclelora poison --train my-topics/clean/train.csv --dev my-topics/clean/dev.csv \\
        --test my-topics/clean/test.csv --label-column topic --target-label 0 --attack badnets \\
        --triggers zq,vx --output-dir my-topics/data/four-topics/poison/badnets-zq
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

TOPICS = {
    "business": ["market", "shares", "profit", "bank", "company", "investors", "trade", "prices"],
    "science": ["research", "study", "scientists", "space", "energy", "climate", "cells", "physics"],
    "sports": ["team", "match", "goal", "season", "coach", "players", "league", "win"],
    "travel": ["hotel", "flight", "beach", "tourists", "city", "trip", "museum", "island"],
}
FILLER = ["the", "a", "new", "report", "says", "this", "week", "after", "more", "year", "people", "big", "on", "in"]


def sentence(rng: random.Random, topic: str) -> str:
    words = rng.sample(FILLER, 5) + rng.sample(TOPICS[topic], 2)
    rng.shuffle(words)
    return " ".join(words)


def write_split(path: Path, rows: int, rng: random.Random) -> None:
    topics = sorted(TOPICS)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["text", "topic"])
        for i in range(rows):
            topic = topics[i % len(topics)]
            writer.writerow([sentence(rng, topic), topic])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="four-topics-clean", help="Where train.csv, dev.csv, test.csv go")
    parser.add_argument("--rows", default="400,100,200", help="Rows of train,dev,test (default 400,100,200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for split, rows in zip(("train", "dev", "test"), (int(n) for n in args.rows.split(","))):
        write_split(out / f"{split}.csv", rows, rng)
        print(f"{out / f'{split}.csv'}: {rows} rows, 4 topics")


if __name__ == "__main__":
    main()
