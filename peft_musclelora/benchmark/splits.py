"""The trusted-row split: which clean-dev rows a defense may train on, and which are left for checkpoint selection.

Gradient alignment (`MuScleLoraTrainer` with `reference_split_size=k`) takes `k` reference rows from the eval set
and removes them from it. The `clean-only` baseline must train on exactly those rows, so both go through
[`reference_split`]: a `torch.randperm` of the row indices drawn from a `torch.Generator` seeded with `seed`; the
first `k` indices (sorted) are the trusted rows, the rest (sorted) stay in dev (with `reference_stratify`, each
label's share of `k`, taken in the same permutation's order). This is the algorithm of
`MuScleLoraTrainer._split_reference_from_eval` (reference seed = the run's seed), and the tests check that both
pick the same rows. `musclelora analyze` takes its references out of the clean dev rows with it too.
"""

from __future__ import annotations

from typing import Optional

from peft_musclelora.trainer import reference_split_indices

from .data import LoadedData


class NotApplicable(ValueError):
    """A method asked for something the data lacks (no clean training set, no trusted rows, no trigger).

    The bench records the cell as `n/a` with this one-line reason and goes on.
    """


def reference_split(
    num_rows: int, size: int, seed: int, labels: Optional[list[int]] = None
) -> tuple[list[int], list[int]]:
    """Indices `(trusted, rest)` of a seeded split of `num_rows` rows into `size` trusted rows and the rest.

    Both lists are sorted. Same `(num_rows, size, seed)`, same split; with the same seed and dev set a larger
    `size` contains every row of a smaller one (both are prefixes of the same permutation). With `labels` (one per
    row: `reference_stratify=True`) each label gets its share of `size`, as the trainer's stratified split does.

    Example:
        >>> reference_split(6, 2, seed=0)
        ([2, 5], [0, 1, 3, 4])
        >>> reference_split(6, 2, seed=0, labels=[1, 1, 0, 1, 1, 0])
        ([2, 3], [0, 1, 4, 5])

    Raises:
        NotApplicable: `size` is not in `[1, num_rows)` (at least one row must be left for selection).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise NotApplicable(f"reference_split_size must be an integer >= 1, got {size!r}.")
    if size >= num_rows:
        raise NotApplicable(
            f"no trusted rows to spare: reference_split_size={size} needs more than {size} clean dev rows, "
            f"the dev set has {num_rows}."
        )
    return reference_split_indices(num_rows, size, seed, labels)


def split_trusted(dev: LoadedData, size: int, seed: int, stratify: bool = False) -> tuple[LoadedData, LoadedData]:
    """`(trusted, rest)` of a clean dev set: the rows GA would use as references, and the rows left for selection
    (stratified by label with `stratify`, the preset's `reference_stratify`).

    Example:
        >>> from peft_musclelora.benchmark.data import Record, from_records
        >>> dev = from_records([Record(f"text {i}", i % 2) for i in range(6)], "dev")
        >>> trusted, rest = split_trusted(dev, 2, seed=0)
        >>> trusted.texts, len(rest)
        (['text 2', 'text 5'], 4)
    """
    trusted_idx, rest_idx = reference_split(len(dev), size, seed, dev.labels if stratify else None)
    how = f"{size}, seed {seed}{', stratified' if stratify else ''}"
    trusted = dev.replace([dev.records[i] for i in trusted_idx], f"{dev.source} (trusted {how})")
    rest = dev.replace([dev.records[i] for i in rest_idx], f"{dev.source} (minus trusted {how})")
    return trusted, rest
