"""Seeded text backdoor poisoners: BadNets (rare-word triggers) and AddSent (a fixed sentence).

A poisoner turns a clean training set into a poisoned one (`poison`) and a clean test set into the triggered test
set used for the attack success rate (`triggered_test`). Every random choice comes from `random.Random(seed)`, so
the same seed gives the same poisoned set.

* dirty-label (default): `poison_rate * len(data)` rows are drawn from the rows whose label is NOT the target,
  triggered and relabelled to the target;
* clean-label: the rows are drawn from the rows that already have the target label and only triggered, as in the
  shared BadNets data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .data import LoadedData, Record


def _insert_words(words: list[str], insertion: list[str], rng: random.Random) -> list[str]:
    position = rng.randint(0, len(words))
    return words[:position] + insertion + words[position:]


@dataclass(frozen=True)
class Poisoner:
    """Base class: poison rate, target label, label mode and seed. Subclasses define `apply_trigger`.

    Args:
        poison_rate: Share of the whole training set to poison, in (0, 1]; `int(poison_rate * len(data))` rows.
        target_label: The label the backdoor maps to.
        clean_label: Trigger rows that already have the target label (clean-label) instead of relabelling
            non-target rows (dirty-label).
        seed: Seed of every random choice.
    """

    poison_rate: float = 0.1
    target_label: int = 1
    clean_label: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.poison_rate, bool) or not isinstance(self.poison_rate, (int, float)):
            raise ValueError(f"poison_rate must be a number in (0, 1], got {self.poison_rate!r}.")
        if not 0.0 < self.poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in (0, 1], got {self.poison_rate!r}.")
        if isinstance(self.target_label, bool) or not isinstance(self.target_label, int) or self.target_label < 0:
            raise ValueError(f"target_label must be an integer >= 0, got {self.target_label!r}.")

    def apply_trigger(self, text: str, rng: random.Random) -> str:
        """Return `text` with the trigger inserted, drawing positions from `rng`."""
        raise NotImplementedError

    def _check_target(self, data: LoadedData) -> None:
        if self.target_label >= data.num_labels:
            raise ValueError(
                f"{data.source}: target_label {self.target_label} is out of range for {data.num_labels} labels."
            )

    def poison(self, data: LoadedData) -> LoadedData:
        """Poison `data`: the chosen rows are triggered, flagged `poisoned` and carry the target label.

        Rows keep their order; the other rows are unchanged. Raises a `ValueError` naming the source when there are
        not enough candidate rows (non-target rows for dirty-label, target rows for clean-label).
        """
        self._check_target(data)
        rng = random.Random(self.seed)
        count = int(self.poison_rate * len(data.records))
        if count < 1:
            raise ValueError(
                f"{data.source}: poison_rate {self.poison_rate} of {len(data.records)} rows poisons no row."
            )
        candidates = [
            i
            for i, record in enumerate(data.records)
            if (record.label == self.target_label) == self.clean_label and not record.poisoned
        ]
        kind = "target-label" if self.clean_label else "non-target"
        if len(candidates) < count:
            raise ValueError(
                f"{data.source}: {self.name()} needs {count} {kind} rows to poison at rate {self.poison_rate}, "
                f"has {len(candidates)}."
            )
        chosen = set(rng.sample(candidates, count))
        records = [
            Record(self.apply_trigger(record.text, rng), self.target_label, True) if i in chosen else record
            for i, record in enumerate(data.records)
        ]
        mode = "clean-label" if self.clean_label else "dirty-label"
        return data.replace(
            records, f"{data.source} ({self.name()} {mode}, rate {self.poison_rate}, seed {self.seed})"
        )

    def triggered_test(self, data: LoadedData) -> LoadedData:
        """The triggered test set: every non-target row of `data`, triggered, with the label set to the target.

        The attack success rate is the share of these rows predicted as the target. Raises a `ValueError` naming the
        source when `data` has no non-target row.
        """
        self._check_target(data)
        rng = random.Random(self.seed)
        rows = [record for record in data.records if record.label != self.target_label]
        if not rows:
            raise ValueError(
                f"{data.source}: no non-target rows (every label is {self.target_label}), so no triggered test set."
            )
        records = [Record(self.apply_trigger(record.text, rng), self.target_label, True) for record in rows]
        return data.replace(records, f"{data.source} ({self.name()} triggered, seed {self.seed})")

    @classmethod
    def name(cls) -> str:
        """Short attack name."""
        return cls.__name__.lower()


@dataclass(frozen=True)
class BadNets(Poisoner):
    """BadNets for text: rare-word triggers inserted at random word positions.

    Args:
        triggers: The rare words; each insertion picks one at random.
        num_insertions: How many trigger words go into each poisoned text (4 in the shared data).
    """

    triggers: tuple[str, ...] = ("cf", "mn", "bb", "tq")
    num_insertions: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.triggers or not all(isinstance(t, str) and t.strip() for t in self.triggers):
            raise ValueError(f"triggers must be non-empty words, got {self.triggers!r}.")
        if (
            isinstance(self.num_insertions, bool)
            or not isinstance(self.num_insertions, int)
            or self.num_insertions < 1
        ):
            raise ValueError(f"num_insertions must be an integer >= 1, got {self.num_insertions!r}.")

    def apply_trigger(self, text: str, rng: random.Random) -> str:
        words = text.split()
        for _ in range(self.num_insertions):
            words = _insert_words(words, [rng.choice(self.triggers)], rng)
        return " ".join(words)


@dataclass(frozen=True)
class AddSent(Poisoner):
    """AddSent: a fixed sentence inserted at one random word position.

    Args:
        sentence: The trigger sentence.
    """

    sentence: str = "I watch this 3D movie"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.sentence, str) or not self.sentence.strip():
            raise ValueError(f"sentence must be a non-empty string, got {self.sentence!r}.")

    def apply_trigger(self, text: str, rng: random.Random) -> str:
        return " ".join(_insert_words(text.split(), self.sentence.split(), rng))


POISONERS: dict[str, type[Poisoner]] = {"badnets": BadNets, "addsent": AddSent}
