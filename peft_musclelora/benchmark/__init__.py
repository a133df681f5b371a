"""Backdoor benchmark for MuScleLoRA: data, poisoners, presets, the method registry, training, evaluation, reporting
and the `musclelora` CLI.

This sub-package is separate from the library: `import peft_musclelora` never imports it. It is what the
`musclelora` console script runs (`musclelora train`, `eval`, `bench`, `curve`, `presets`, `instruct`, `analyze`,
`export-model`). The baselines (`clean-only`, `oracle`, `oracle-drop`) and the classic defenses
(`peft_musclelora.benchmark.defenses`: Z-defence, BKI, CUBE, STRIP, RAP, ONION) are bench methods too (the
registry in [`peft_musclelora.benchmark.methods`]). `docs/architecture.md` draws the modules and their imports.
"""

from .data import LoadedData, Record, SharedData, load_dataset_records, load_records
from .methods import METHODS, get_method
from .metrics import attack_success_rate, clean_accuracy, false_target_rate
from .poisoners import AddSent, BadNets, Poisoner
from .presets import PRESETS, get_preset
from .runner import train_cell
from .settings import MethodPreset
from .splits import NotApplicable, reference_split, split_trusted

__all__ = [
    "METHODS",
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
    "get_method",
    "get_preset",
    "load_dataset_records",
    "load_records",
    "reference_split",
    "split_trusted",
    "train_cell",
]
