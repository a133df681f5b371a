"""Load PEFT adapters from safetensors only, after checking every file, with one-line errors.

`PeftModel.from_pretrained` falls back to a pickled `adapter_model.bin` when no `adapter_model.safetensors` is there,
and unpickling can run arbitrary code (torch's `weights_only` check is the only guard, and its message advises turning
it off). [`load_adapter_safely`] refuses that before torch ever opens the file, and turns the errors a damaged
directory gives deep inside PEFT (a bare `KeyError`, `SafetensorError` without a file name, "Repo id must be in the
form ...") into a `ValueError` that names the file and what is wrong with it.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> import torch
    >>> from peft import get_peft_model
    >>> from transformers import BertConfig, BertModel
    >>> from peft_musclelora import MuScleLoraConfig, load_adapter_safely
    >>> def tiny_bert():
    ...     torch.manual_seed(0)
    ...     config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...                         vocab_size=100)
    ...     return BertModel(config)
    >>> adapter_dir = tempfile.TemporaryDirectory()
    >>> get_peft_model(tiny_bert(), MuScleLoraConfig(target_modules=["query"], r=2)).save_pretrained(adapter_dir.name)
    >>> sorted(path.name for path in Path(adapter_dir.name).iterdir())
    ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    >>> type(load_adapter_safely(tiny_bert(), adapter_dir.name)).__name__
    'PeftModel'
    >>> _ = (Path(adapter_dir.name) / "adapter_model.bin").write_bytes(b"")  # a pickle beside the safetensors
    >>> load_adapter_safely(tiny_bert(), adapter_dir.name)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: .../adapter_model.bin: refusing to load a pickled adapter file (adapter_model.bin); ...
    >>> adapter_dir.cleanup()
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import torch

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: File endings of pickled checkpoints (torch.save, pickle): never loaded by this project.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

PathLike = Union[str, os.PathLike]


def refuse_pickles(directory: PathLike, what: str = "adapter") -> None:
    """Raise a `ValueError` naming the file when `directory` holds a pickled checkpoint (see [`PICKLE_SUFFIXES`]).

    Any such file is refused, even beside a safetensors file: a directory that carries one was not written by this
    project, and loaders that prefer the pickle exist (or may in future versions).
    """
    directory = Path(directory)
    pickled = sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"{directory / pickled[0]}: refusing to load a pickled {what} file ({', '.join(pickled)}); unpickling can "
            f"run arbitrary code. This project loads safetensors only: re-save the {what} with "
            "`save_pretrained(..., safe_serialization=True)`."
        )


def check_safetensors_file(path: PathLike, what: str = "adapter weights") -> dict[str, torch.Tensor]:
    """Read a safetensors file completely; `ValueError` naming the file when it is missing, empty, truncated, not
    safetensors, or holds a NaN or infinite value (the tensor named). Returns the tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} file is missing (expected safetensors written by save_pretrained).")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: {what} file is empty (0 bytes).")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: not a valid safetensors file (truncated or damaged?): {detail}") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{path}: tensor {name!r} holds {bad} NaN or infinite values; refusing to load it.")
    return tensors


def check_adapter_config(path: PathLike) -> dict[str, Any]:
    """Parse `adapter_config.json`; `ValueError` naming the file for invalid JSON, a non-object or an unknown
    `peft_type`. Returns the parsed config."""
    from peft.utils import PeftType

    import peft_musclelora  # noqa: F401  (registers the musclelora PEFT type, so it counts as known)

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: adapter config is missing (not a PEFT adapter directory).")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}).") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}.")
    known = [member.value for member in PeftType]
    peft_type = config.get("peft_type")
    if peft_type not in known:
        raise ValueError(f"{path}: field 'peft_type' = {peft_type!r} is not a known PEFT type; known: {known}.")
    return config


def check_adapter_dir(adapter_dir: PathLike) -> dict[str, Any]:
    """Check a saved adapter directory without loading a model; returns its parsed `adapter_config.json`.

    Checks, in this order: the directory exists; it holds no pickled file; `adapter_config.json` is valid JSON with a
    known `peft_type`; `adapter_model.safetensors` is present, complete and finite. Every failure is a `ValueError`
    naming the file.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        kind = "is not a directory" if adapter_dir.exists() else "does not exist"
        raise ValueError(f"{adapter_dir}: adapter directory {kind}.")
    refuse_pickles(adapter_dir)
    config = check_adapter_config(adapter_dir / ADAPTER_CONFIG_NAME)
    check_safetensors_file(adapter_dir / ADAPTER_WEIGHTS_NAME)
    return config


def load_adapter_safely(model: torch.nn.Module, adapter_dir: PathLike, **kwargs: Any) -> Any:
    """`PeftModel.from_pretrained(model, adapter_dir, **kwargs)` from a local directory, after [`check_adapter_dir`].

    Use it instead of `PeftModel.from_pretrained` / `AutoPeftModel*` for adapters you did not write yourself: PEFT
    itself has no `use_safetensors` switch for adapters and unpickles `adapter_model.bin` when no safetensors file is
    there. Only local directories are accepted (nothing is downloaded).

    Args:
        model: The base model.
        adapter_dir: The directory `save_pretrained` wrote.
        kwargs: Passed on to `PeftModel.from_pretrained` (`adapter_name`, `is_trainable`, ...).

    Raises:
        ValueError: The directory is missing, holds a pickle, or its config or weights are invalid (file named).
    """
    from peft import PeftModel

    check_adapter_dir(adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir), **kwargs)
