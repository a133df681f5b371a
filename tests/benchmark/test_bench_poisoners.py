"""Specification of the seeded BadNets and AddSent poisoners."""

from __future__ import annotations

import pytest

from peft_musclelora.benchmark.data import LoadedData, Record, from_records
from peft_musclelora.benchmark.poisoners import AddSent, BadNets


def clean_set(n: int = 100) -> LoadedData:
    return from_records([Record(f"w{i} a b c d e", i % 2) for i in range(n)], "toy")


class TestBadNets:
    def test_same_seed_same_poisoned_set_other_seed_differs(self) -> None:
        data = clean_set()
        assert BadNets(seed=3).poison(data).records == BadNets(seed=3).poison(data).records
        assert BadNets(seed=3).poison(data).records != BadNets(seed=4).poison(data).records

    def test_dirty_label_poisons_the_rate_of_non_target_rows_and_relabels_them(self) -> None:
        data = clean_set(100)
        poisoned = BadNets(poison_rate=0.1, target_label=1).poison(data)
        changed = [(old, new) for old, new in zip(data.records, poisoned.records) if old != new]
        assert len(changed) == 10 == poisoned.num_poisoned
        assert all(old.label == 0 and new.label == 1 and new.poisoned for old, new in changed)
        assert len(poisoned) == len(data)

    def test_clean_label_triggers_only_target_rows(self) -> None:
        data = clean_set(100)
        poisoned = BadNets(poison_rate=0.1, clean_label=True).poison(data)
        changed = [(old, new) for old, new in zip(data.records, poisoned.records) if old != new]
        assert len(changed) == 10 and all(old.label == 1 == new.label for old, new in changed)

    def test_inserts_four_trigger_words_keeping_the_original_words_in_order(self) -> None:
        poisoned = BadNets(poison_rate=0.5).poison(clean_set(20))
        for record in poisoned.records:
            if record.poisoned:
                words = record.text.split()
                assert sum(w in {"cf", "mn", "bb", "tq"} for w in words) == 4
                assert [w for w in words if w not in {"cf", "mn", "bb", "tq"}][1:] == ["a", "b", "c", "d", "e"]

    def test_trigger_positions_vary(self) -> None:
        poisoned = BadNets(poison_rate=0.5, num_insertions=1, triggers=("cf",)).poison(clean_set(40))
        positions = {r.text.split().index("cf") for r in poisoned.records if r.poisoned}
        assert len(positions) > 2

    def test_not_enough_candidates_is_an_error_naming_the_source(self) -> None:
        only_target = from_records([Record("a b", 1)] * 10, "pos.csv")
        with pytest.raises(ValueError, match="pos.csv: badnets needs 1 non-target rows .* has 0"):
            BadNets(poison_rate=0.1).poison(only_target)

    @pytest.mark.parametrize("rate", [0, 1.5, -0.1, True])
    def test_bad_rate(self, rate: float) -> None:
        with pytest.raises(ValueError, match="poison_rate"):
            BadNets(poison_rate=rate)


class TestAddSent:
    def test_inserts_the_sentence_once_and_contiguously(self) -> None:
        poisoned = AddSent(poison_rate=0.2, seed=1).poison(clean_set(50))
        rows = [r for r in poisoned.records if r.poisoned]
        assert len(rows) == 10
        assert all(r.text.count("I watch this 3D movie") == 1 and r.label == 1 for r in rows)
        starts = {r.text.split().index("I") for r in rows}
        assert len(starts) > 1

    def test_deterministic(self) -> None:
        data = clean_set()
        assert AddSent(seed=7).poison(data).records == AddSent(seed=7).poison(data).records


class TestTriggeredTestSet:
    def test_holds_every_non_target_row_triggered_with_the_target_label(self) -> None:
        data = clean_set(30)
        triggered = AddSent(target_label=1).triggered_test(data)
        assert len(triggered) == 15
        assert all(r.label == 1 and r.poisoned and "I watch this 3D movie" in r.text for r in triggered.records)
        assert triggered.records == AddSent(target_label=1).triggered_test(data).records

    def test_no_non_target_rows_is_an_error_naming_the_file(self) -> None:
        with pytest.raises(ValueError, match="test-poison.csv: no non-target rows"):
            BadNets(target_label=1).triggered_test(from_records([Record("a", 1)], "test-poison.csv"))

    def test_target_out_of_range(self) -> None:
        with pytest.raises(ValueError, match="target_label 2 is out of range for 2 labels"):
            BadNets(target_label=2).triggered_test(clean_set())
