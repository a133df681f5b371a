"""Backdoor benchmark for MuScleLoRA: data loaders, poisoners, metrics, method presets, runner and the CLI.

This sub-package is separate from the library: `import peft_musclelora` never imports it. It is what the
`musclelora` console script runs (`musclelora train`, `musclelora eval`, `musclelora bench`, `musclelora presets`).
Heavy pieces (transformers, the trainer, matplotlib) are imported lazily by the functions that need them.
"""

from .data import LoadedData, Record, SharedData, load_dataset_records, load_records
from .methods import PRESETS, MethodPreset, get_preset
from .metrics import attack_success_rate, clean_accuracy, false_target_rate
from .poisoners import AddSent, BadNets, Poisoner

__all__ = [
    "PRESETS",
    "AddSent",
    "BadNets",
    "LoadedData",
    "MethodPreset",
    "Poisoner",
    "Record",
    "SharedData",
    "attack_success_rate",
    "clean_accuracy",
    "false_target_rate",
    "get_preset",
    "load_dataset_records",
    "load_records",
]
