"""Backdoor benchmark for MuScleLoRA: data loaders, poisoners, metrics, method presets, runner and the CLI.

This sub-package is separate from the library: `import peft_musclelora` never imports it. It is what the
`musclelora` console script runs (`musclelora train`, `eval`, `bench`, `curve`, `presets`). The baselines
(`clean-only`, `oracle`) and the classic defenses (`peft_musclelora.benchmark.defenses`: Z-defence, BKI, CUBE,
STRIP, RAP, ONION) are bench methods too ([`run_method`]).
Heavy pieces (transformers, the trainer, matplotlib) are imported lazily by the functions that need them.
"""

from .cells import run_method
from .data import LoadedData, Record, SharedData, load_dataset_records, load_records
from .methods import PRESETS, MethodPreset, get_preset
from .metrics import attack_success_rate, clean_accuracy, false_target_rate
from .poisoners import AddSent, BadNets, Poisoner
from .splits import NotApplicable, reference_split, split_trusted

__all__ = [
    "PRESETS",
    "AddSent",
    "BadNets",
    "LoadedData",
    "MethodPreset",
    "NotApplicable",
    "Poisoner",
    "Record",
    "SharedData",
    "attack_success_rate",
    "clean_accuracy",
    "false_target_rate",
    "get_preset",
    "load_dataset_records",
    "load_records",
    "reference_split",
    "run_method",
    "split_trusted",
]
