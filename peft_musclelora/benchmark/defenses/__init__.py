"""Classic backdoor defenses the benchmark compares MuScleLoRA with, behind one small API.

Training-data filters (then undefended LoRA is trained on the rows they keep):

* [`ZDefence`] — z-scores of token–label co-occurrence (He et al. 2023); no model.
* [`Bki`] — backdoor keyword identification from representation changes under word deletion (Chen & Dai 2021).
* [`Cube`] — HDBSCAN clusters of the poisoned model's representations, minority clusters dropped (Cui et al. 2022).

Inference-time detectors on the undefended model (threshold on clean dev at a fixed false-rejection rate):

* [`Strip`] — prediction entropy under word swaps (Gao et al. 2021).
* [`Rap`] — robustness-aware perturbation word (Yang et al. 2021).
* [`Onion`] — perplexity-based deletion of suspicious words with a local causal LM (Qi et al. 2021).

Each is also a `musclelora bench` method of the same name (`zdefence`, `bki`, `cube`, `strip`, `rap`, `onion`),
registered in [`peft_musclelora.benchmark.methods`] and configured with `--set <name>.<field>=<value>`.
"""

from .base import DetectionResult, FilterResult, ModelScorer, NotApplicable, threshold_for_frr
from .bki import Bki
from .cube import Cube
from .onion import Onion, load_causal_lm
from .rap import Rap
from .strip import Strip
from .zdefence import ZDefence

__all__ = [
    "Bki",
    "Cube",
    "DetectionResult",
    "FilterResult",
    "ModelScorer",
    "NotApplicable",
    "Onion",
    "Rap",
    "Strip",
    "ZDefence",
    "load_causal_lm",
    "threshold_for_frr",
]
