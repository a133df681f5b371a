"""CUBE (Cui et al., NeurIPS 2022 Datasets and Benchmarks): drop the minority clusters of each label.

A model fine-tuned on the poisoned set separates the poisoned rows from the clean rows of the target label in its
representation space. CUBE embeds every training row with that model, reduces the representations (the paper uses
UMAP; here PCA to `n_components`, seeded), clusters them with HDBSCAN, and, for each label, keeps the rows of that
label in its largest cluster and drops the rows of that label in every other cluster (HDBSCAN's noise points are
kept). The model is then trained again on the kept rows.

Needs scikit-learn (>= 1.3 for `sklearn.cluster.HDBSCAN`): install `peft-musclelora[defenses]`. Cost: one forward
per training row plus the clustering (seconds for a few thousand rows).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .base import FilterResult


def _sklearn() -> tuple[Any, Any]:
    try:
        from sklearn.cluster import HDBSCAN
        from sklearn.decomposition import PCA
    except ImportError:
        raise ValueError(
            "CUBE needs scikit-learn >= 1.3 (sklearn.cluster.HDBSCAN): install peft-musclelora[defenses]."
        ) from None
    return PCA, HDBSCAN


@dataclass
class Cube:
    """CUBE filter.

    Args:
        encoder: Has `embed(texts) -> array (n, hidden)`; the model fine-tuned on the poisoned set.
        n_components: PCA dimensions before clustering.
        min_cluster_size: HDBSCAN's smallest cluster; None: 2% of the rows (at least 5).
        seed: Seed of the PCA.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> class Toy:  # clean rows near (0, 0) or (9, 9) by label, triggered rows near (0, 9)
        ...     def embed(self, texts):
        ...         centre = {"pos": [9, 9], "neg": [0, 0], "cf": [0, 9]}
        ...         return np.array([centre[t.split()[0]] for t in texts]) + rng.normal(0, 0.3, (len(texts), 2))
        >>> texts = ["pos"] * 40 + ["neg"] * 40 + ["cf"] * 8
        >>> result = Cube(Toy(), n_components=2).fit(texts, [1] * 40 + [0] * 40 + [1] * 8)
        >>> result.keep_mask[80:] == [False] * 8, result.removed
        (True, 8)
    """

    encoder: Any
    n_components: int = 10
    min_cluster_size: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components!r}.")
        if self.min_cluster_size is not None and self.min_cluster_size < 2:
            raise ValueError(f"min_cluster_size must be >= 2 or None, got {self.min_cluster_size!r}.")

    def clusters(self, texts: Sequence[str]) -> list[int]:
        """HDBSCAN cluster id of each row (-1: noise)."""

        PCA, HDBSCAN = _sklearn()
        features = np.asarray(self.encoder.embed(texts), dtype=np.float64)
        components = min(self.n_components, features.shape[1], max(1, len(texts) - 1))
        reduced = PCA(n_components=components, random_state=self.seed).fit_transform(features)
        size = self.min_cluster_size or max(5, int(0.02 * len(texts)))
        return [int(c) for c in HDBSCAN(min_cluster_size=size).fit_predict(reduced)]

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> FilterResult:
        """Keep each label's largest cluster (and noise); a row's score is 1 minus its cluster's share of the label."""
        if len(texts) != len(labels):
            raise ValueError(f"texts and labels differ in length: {len(texts)} vs {len(labels)}.")
        ids = self.clusters(texts)
        keep, scores = [True] * len(texts), [0.0] * len(texts)
        per_label: dict[int, Counter[int]] = {}
        for cluster, label in zip(ids, labels):
            if cluster >= 0:
                per_label.setdefault(int(label), Counter())[cluster] += 1
        for i, (cluster, label) in enumerate(zip(ids, labels)):
            counts = per_label.get(int(label))
            if cluster < 0 or not counts:
                continue
            biggest = max(counts.values())
            scores[i] = 1.0 - counts[cluster] / biggest
            keep[i] = counts[cluster] == biggest and cluster == min(c for c, n in counts.items() if n == biggest)
        details = {
            "clusters": len(set(ids) - {-1}),
            "noise_rows": ids.count(-1),
            "per_label": {str(k): dict(sorted(v.items())) for k, v in sorted(per_label.items())},
        }
        return FilterResult(keep, scores, details)
