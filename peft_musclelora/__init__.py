"""MuScleLoRA as a PEFT tuner: multi-scale low-rank adaptation plus gradient alignment against backdoor poisoning.

`import peft_musclelora` registers the `musclelora` PEFT method, after which [`MuScleLoraConfig`] works everywhere a
`LoraConfig` does: `get_peft_model`, `PeftModel.from_pretrained`, `AutoPeftModel*`, `inject_adapter_in_model` and
transformers' `model.add_adapter`.
"""

import importlib
from typing import Any

from . import _noise  # noqa: F401  (first: PEFT imports bitsandbytes, whose import-time message it filters)

# isort: split

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import MuScleLoraConfig
from .frequency import FrequencyAnalysisCallback, FrequencyAnalyzer
from .gradient_alignment import AlignmentStats, GradientAlignmentArguments, align_gradients
from .heads import MSLRClassificationHead, add_mslr_classification_head, head_state_dict, llama_musclelora_config
from .layer import Linear, MuScleLoraLayer
from .local_models import export_gguf_to_hf, smollm2_gguf_path
from .model import MuScleLoraModel
from .peft_type import MUSCLELORA_NAME, MUSCLELORA_PEFT_TYPE
from .row_filter import RowFilterArguments, run_row_filter
from .safe_loading import check_adapter_dir, load_adapter_safely
from .trainer import GradientAlignmentMixin, MuScleLoraTrainer, MuScleLoraTrainingArguments

__version__ = "0.1.0"

if MUSCLELORA_PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(
        name=MUSCLELORA_NAME, config_cls=MuScleLoraConfig, model_cls=MuScleLoraModel, prefix=MuScleLoraModel.prefix
    )

_TRL_NAMES = ("MuScleLoraSFTConfig", "MuScleLoraSFTTrainer")


def __getattr__(name: str) -> Any:
    """Import the TRL trainers lazily, so `trl` stays an optional dependency."""
    if name in _TRL_NAMES:
        return getattr(importlib.import_module(".sft", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MUSCLELORA_PEFT_TYPE",
    "AlignmentStats",
    "FrequencyAnalysisCallback",
    "FrequencyAnalyzer",
    "GradientAlignmentArguments",
    "GradientAlignmentMixin",
    "Linear",
    "MuScleLoraConfig",
    "MuScleLoraLayer",
    "MuScleLoraModel",
    "MuScleLoraTrainer",
    "MuScleLoraTrainingArguments",
    "RowFilterArguments",
    "__version__",
    "align_gradients",
    "check_adapter_dir",
    "load_adapter_safely",
    "run_row_filter",
    "MSLRClassificationHead",
    "add_mslr_classification_head",
    "export_gguf_to_hf",
    "head_state_dict",
    "llama_musclelora_config",
    "smollm2_gguf_path",
]
