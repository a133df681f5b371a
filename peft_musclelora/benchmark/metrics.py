"""Backdoor metrics as pure functions of predicted and true labels.

* CACC, clean accuracy: accuracy on the clean test set.
* ASR, attack success rate: share of triggered non-target rows predicted as the target label.
* False-target rate: share of clean non-target rows predicted as the target. A weak model that predicts the target
  often has a high "ASR" without any backdoor; this is the floor to read ASR against. With more than two labels it
  is also given per non-target class (`false_target_rate_by_label`): the overall rate is their row-weighted mean.

Model selection (checkpointing) uses clean dev accuracy only; these functions are for the final test report.
All rates are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence


def _check_lengths(name: str, predictions: Sequence[int], labels: Sequence[int]) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{name}: {len(predictions)} predictions but {len(labels)} labels.")
    if not predictions:
        raise ValueError(f"{name}: no rows to score.")


def clean_accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """CACC: share of clean rows whose prediction equals the label."""
    _check_lengths("clean_accuracy", predictions, labels)
    return sum(int(p) == int(y) for p, y in zip(predictions, labels)) / len(labels)


def attack_success_rate(predictions: Sequence[int], target_label: int) -> float:
    """ASR: share of triggered rows predicted as `target_label`.

    `predictions` are on the triggered test set, which holds only rows whose true label is not the target
    (OpenBackdoor's `test-poison.csv`, or [`Poisoner.triggered_test`]).
    """
    if not predictions:
        raise ValueError("attack_success_rate: no triggered rows to score.")
    return sum(int(p) == target_label for p in predictions) / len(predictions)


def false_target_rate(predictions: Sequence[int], labels: Sequence[int], target_label: int) -> float:
    """Share of clean rows whose true label is not the target that are predicted as the target."""
    _check_lengths("false_target_rate", predictions, labels)
    non_target = [int(p) for p, y in zip(predictions, labels) if int(y) != target_label]
    if not non_target:
        raise ValueError(f"false_target_rate: no clean row has a label other than the target {target_label}.")
    return sum(p == target_label for p in non_target) / len(non_target)


def false_target_rate_by_label(
    predictions: Sequence[int], labels: Sequence[int], target_label: int
) -> dict[str, float]:
    """The false-target rate of each non-target class, keyed by the class id as a string (JSON keys).

    Example:
        >>> false_target_rate_by_label([0, 1, 1, 2, 1], [0, 0, 1, 2, 2], target_label=1)
        {'0': 0.5, '2': 0.5}
    """
    _check_lengths("false_target_rate_by_label", predictions, labels)
    rows: dict[int, list[int]] = {}
    for p, y in zip(predictions, labels):
        if int(y) != target_label:
            rows.setdefault(int(y), []).append(int(p) == target_label)
    return {str(label): sum(hits) / len(hits) for label, hits in sorted(rows.items())}


def backdoor_metrics(
    clean_predictions: Sequence[int],
    clean_labels: Sequence[int],
    poison_predictions: Sequence[int],
    target_label: int,
) -> dict[str, float]:
    """CACC, ASR and false-target rate together, keyed `cacc`, `asr`, `false_target_rate` (the per-class rates are
    [`false_target_rate_by_label`])."""
    return {
        "cacc": clean_accuracy(clean_predictions, clean_labels),
        "asr": attack_success_rate(poison_predictions, target_label),
        "false_target_rate": false_target_rate(clean_predictions, clean_labels, target_label),
    }
