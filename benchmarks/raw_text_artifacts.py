"""Surface artefacts of the shared poisoned sets' raw text, which no defense here may use (session 13).

The shared SST-2 rows are lower-cased and tokenised (spaces before punctuation); the paraphrase attacks' poisoned
rows were written by a generator and may not be. A cased or character-level detector would then find the poisoned
rows by their surface, not by their trigger: evidence about this data set, not about a defense. MiniLM-L6's
tokenizer lower-cases and splits punctuation, so the model and the n-gram probe never see these differences. For each
attack this prints, for the poisoned rows and for the clean rows of the target label, the share with an upper-case
letter, with a space before a comma or full stop, and with a word glued to its punctuation, and the mean length in
words. The poison flags are read to split the groups.

    python benchmarks/raw_text_artifacts.py --attacks badnets,addsent,stylebkd,synbkd
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from peft_musclelora.benchmark.data import load_records

CHECKS = {
    "upper-case letter": lambda text: any(character.isupper() for character in text),
    "space before , or .": lambda text: " ." in text or " ," in text,
    "word glued to punctuation": lambda text: re.search(r"\w[.,!?]", text) is not None,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default="badnets,addsent,stylebkd,synbkd")
    parser.add_argument("--data", default=os.environ.get("MUSCLELORA_DATA", "../shared/data"))
    parser.add_argument("--target", type=int, default=1)
    args = parser.parse_args()
    print("| attack | rows | " + " | ".join(CHECKS) + " | mean words |")
    print("|---|---|" + "---|" * (len(CHECKS) + 1))
    for attack in args.attacks.split(","):
        records = load_records(Path(args.data) / "sst-2" / "poison" / attack / "train-mixed-0.1.csv").records
        groups = {
            "poisoned": [r.text for r in records if r.poisoned],
            "clean, target label": [r.text for r in records if not r.poisoned and r.label == args.target],
        }
        for group, texts in groups.items():
            shares = [100 * sum(map(check, texts)) / len(texts) for check in CHECKS.values()]
            words = sum(len(text.split()) for text in texts) / len(texts)
            cells = " | ".join(f"{share:.1f} %" for share in shares)
            print(f"| {attack} | {group} ({len(texts)}) | {cells} | {words:.1f} |")


if __name__ == "__main__":
    main()
