"""MuScleLoRA as a PEFT tuner: multi-scale low-rank adaptation plus gradient alignment against backdoor poisoning.

`import peft_musclelora` registers the `musclelora` PEFT method, after which [`MuScleLoraConfig`] works everywhere a
`LoraConfig` does: `get_peft_model`, `PeftModel.from_pretrained`, `AutoPeftModel*`, `inject_adapter_in_model` and
transformers' `model.add_adapter`.

Example (the whole defence on a tiny BERT built from a config; a real run starts from a pretrained model and a
tokenized data set):
    >>> import tempfile
    >>> import torch
    >>> from peft import get_peft_model
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> import peft_musclelora
    >>> from peft_musclelora.config import bert_musclelora_config
    >>> def tiny_bert():
    ...     torch.manual_seed(0)
    ...     config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...                         vocab_size=100)
    ...     return BertForSequenceClassification(config)
    >>> model = get_peft_model(tiny_bert(), bert_musclelora_config(init_weights="kaiming"))  # the published recipe
    >>> rows = [{"input_ids": torch.randint(3, 100, (6,)), "labels": i % 2} for i in range(16)]
    >>> output_dir = tempfile.TemporaryDirectory()
    >>> args = peft_musclelora.MuScleLoraTrainingArguments(
    ...     output_dir=output_dir.name, gradient_alignment=True, max_steps=2, per_device_train_batch_size=4,
    ...     logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
    ... )
    >>> trainer = peft_musclelora.MuScleLoraTrainer(
    ...     model=model, args=args, train_dataset=rows[:12], reference_dataset=rows[12:]  # 4 trusted clean rows
    ... )
    >>> _ = trainer.train()  # prints one log line per step
    {'loss': ..., 'ga/branch_aligned': ...}
    ...
    >>> trainer.state.log_history[0]["ga/branch_aligned"]  # the step's gradient was aligned with the references
    1.0
    >>> model.save_pretrained(output_dir.name)
    >>> reloaded = peft_musclelora.load_adapter_safely(tiny_bert(), output_dir.name)  # safetensors only
    >>> trained = model.base_model.model.bert.pooler.dense.musclelora_A["default"].weight
    >>> torch.equal(reloaded.base_model.model.bert.pooler.dense.musclelora_A["default"].weight, trained)
    True
    >>> output_dir.cleanup()
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
from .layer import Linear, MuScleLoraLayer
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

_LAZY = {
    "MuScleLoraSFTConfig": ".sft",
    "MuScleLoraSFTTrainer": ".sft",
    # LLM helpers live in sub-modules of their own (`peft_musclelora.heads`, `peft_musclelora.local_models`) and are
    # not part of `__all__`; these names stay importable from here for code written before they moved out.
    "MSLRClassificationHead": ".heads",
    "add_mslr_classification_head": ".heads",
    "head_state_dict": ".heads",
    "llama_musclelora_config": ".heads",
    "export_gguf_to_hf": ".local_models",
    "smollm2_gguf_path": ".local_models",
}


def __getattr__(name: str) -> Any:
    """Import the TRL trainers (so `trl` stays an optional dependency) and the LLM helpers lazily."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
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
]
