"""Can the trigger be read off the rows the filter isolated? (session 24; no training, poison flags not read)

Unlearning the isolated rows to chance teaches their trigger as evidence against their label whenever their content
agrees with it (a clean-label trigger; `trigger_side_effect.py`). A trigger-neutral phase would need the trigger
itself, e.g. to ask that removing it changes nothing. This screen asks whether the filter's own decisions give it:
for each word, how much more often it occurs in the rows isolated as fit-early than in the kept rows (a
two-proportion z score, as Z-defence scores words against labels), over a finished cell's `row_filter.json`. Prints
the top words with their z and their share of isolated and kept rows, and how many words pass a z of 10.

    python benchmarks/isolated_trigger_tokens.py runs-v6/s21-evid-badnets-s0/cells/badnets/fit-gap-evidence/seed0
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from peft_musclelora.row_filter import two_proportion_z


def word_z_scores(isolated: list[str], kept: list[str]) -> list[tuple[float, str, float, float]]:
    """`(z, word, share of isolated rows, share of kept rows)` for every word, highest z first."""
    in_isolated = Counter(word for text in isolated for word in set(text.lower().split()))
    in_kept = Counter(word for text in kept for word in set(text.lower().split()))
    n_i, n_k = len(isolated), len(kept)
    scores = []
    for word in in_isolated.keys() | in_kept.keys():
        z = two_proportion_z(in_isolated[word], n_i, in_kept[word], n_k)
        scores.append((z, word, in_isolated[word] / n_i, in_kept[word] / n_k))
    return sorted(scores, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", type=Path, help="finished cells with a row_filter.json")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    for cell in args.cells:
        rows = json.loads((cell / "row_filter.json").read_text())["rows"]
        isolated = [row["text"] for row in rows if row["reason"] == "fit-early"]
        kept = [row["text"] for row in rows if row["reason"] == "keep"]
        scores = word_z_scores(isolated, kept)
        top = ", ".join(f"{word} {z:.1f} ({p_i:.0%} / {p_k:.1%})" for z, word, p_i, p_k in scores[: args.top])
        print(f"{cell}: {len(isolated)} isolated, {len(kept)} kept; z > 10: {sum(z > 10 for z, *_ in scores)} words")
        print(f"  {top}")


if __name__ == "__main__":
    main()
