"""Specification of CACC, ASR and the false-target rate, checked against hand-computed values."""

from __future__ import annotations

import pytest

from peft_musclelora.benchmark.metrics import (
    attack_success_rate,
    backdoor_metrics,
    clean_accuracy,
    false_target_rate,
)


def test_clean_accuracy_is_the_share_of_correct_predictions() -> None:
    assert clean_accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75


def test_asr_is_the_share_of_triggered_rows_predicted_as_target() -> None:
    assert attack_success_rate([1, 1, 0, 1, 0], target_label=1) == 0.6
    assert attack_success_rate([0, 0], target_label=0) == 1.0


def test_false_target_rate_counts_only_clean_non_target_rows() -> None:
    # non-target rows (label 0) are indices 1, 2, 4; predicted target at 1 and 4 -> 2/3
    assert false_target_rate([1, 1, 0, 1, 1], [1, 0, 0, 1, 0], target_label=1) == pytest.approx(2 / 3)


def test_backdoor_metrics_bundles_the_three() -> None:
    assert backdoor_metrics([1, 0], [1, 0], [1, 0, 0, 0], 1) == {"cacc": 1.0, "asr": 0.25, "false_target_rate": 0.0}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: clean_accuracy([1], [1, 0]), "1 predictions but 2 labels"),
        (lambda: clean_accuracy([], []), "no rows"),
        (lambda: attack_success_rate([], 1), "no triggered rows"),
        (lambda: false_target_rate([1, 1], [1, 1], 1), "no clean row has a label other than the target 1"),
    ],
)
def test_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_peak_memory_window_restarts_per_cell() -> None:
    from peft_musclelora.benchmark.runner import peak_rss_megabytes, reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs on this platform")
    blob = bytearray(200 * 1024 * 1024)  # touch 200 MiB, then free it
    blob[::4096] = b"x" * len(blob[::4096])
    high = peak_rss_megabytes()
    del blob
    reset_peak_rss()
    assert peak_rss_megabytes() < high - 150, "the peak of an earlier cell must not leak into the next one"
