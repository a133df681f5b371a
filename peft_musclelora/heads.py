"""Classification heads for decoder LLMs, as the MuScleLoRA reference builds them for Llama-2 and GPT-2-XL.

The reference replaces the sequence-classification layer `score` (hidden -> labels) with
`dense(hidden -> 16, no bias) -> dropout 0.1 -> out_proj(16 -> labels, no bias)` and puts the multi-scale adapter on
`dense`; LoRA goes on the body (`q_proj`, `v_proj`) at the same time, and the head stays frozen at its random
initialisation. [`add_mslr_classification_head`] does the replacement and [`llama_musclelora_config`] builds the one
[`MuScleLoraConfig`] that expresses the whole recipe (scales [1] on the body, i.e. plain LoRA, and the published
multi-scale pattern on the head).

Example:
    >>> import torch
    >>> from peft import get_peft_model
    >>> from transformers import LlamaConfig, LlamaForSequenceClassification
    >>> from peft_musclelora.heads import add_mslr_classification_head, llama_musclelora_config
    >>> config = LlamaConfig(
    ...     vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    ...     num_labels=2, pad_token_id=0,
    ... )
    >>> model = add_mslr_classification_head(LlamaForSequenceClassification(config), seed=0)
    >>> model.score
    MSLRClassificationHead(
      (dense): Linear(in_features=32, out_features=16, bias=False)
      (dropout): Dropout(p=0.1, inplace=False)
      (out_proj): Linear(in_features=16, out_features=2, bias=False)
    )
    >>> peft_model = get_peft_model(model, llama_musclelora_config())
    >>> sorted({n.split(".")[-3] for n, p in peft_model.named_parameters() if p.requires_grad})
    ['musclelora_A', 'musclelora_B']

The head is a new module the base checkpoint does not have: save it beside the adapter (`head_state_dict`) or rebuild
it with the same `seed` before loading the adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from .config import MuScleLoraConfig
from .layer import MuScleLoraLayer

#: Attribute name of the sequence-classification layer in transformers' decoder models (Llama, GPT-2, Mistral, ...).
SCORE_NAME = "score"


class MSLRClassificationHead(nn.Module):
    """`dense(hidden -> hidden_to) -> dropout -> out_proj(hidden_to -> num_labels)`, no biases, no activation.

    Args:
        hidden_size: Input width (the decoder's hidden size).
        num_labels: Number of classes.
        hidden_to: Width of `dense` (16 in the reference).
        dropout: Dropout between `dense` and `out_proj` (0.1 in the reference).

    Example:
        >>> head = MSLRClassificationHead(32, 2)
        >>> head(torch.zeros(3, 5, 32)).shape
        torch.Size([3, 5, 2])
    """

    def __init__(self, hidden_size: int, num_labels: int, hidden_to: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_labels", num_labels), ("hidden_to", hidden_to)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        self.dense = nn.Linear(hidden_size, hidden_to, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_to, num_labels, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(self.dense(hidden_states)))


def add_mslr_classification_head(
    model: nn.Module,
    hidden_to: int = 16,
    dropout: float = 0.1,
    *,
    seed: Optional[int] = None,
    head_name: str = SCORE_NAME,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Replace the model's classification layer by the reference's `dense -> dropout -> out_proj` head, in place.

    Args:
        model: A transformers `*ForSequenceClassification` decoder (Llama, GPT-2, ...), possibly 4-bit quantized
            (its `score` is never quantized, and neither is the new head).
        hidden_to: Width of `dense`.
        dropout: Dropout between `dense` and `out_proj`.
        seed: Seed of the head's (PyTorch default, Kaiming-uniform) initialisation; None uses the global RNG.
        head_name: Attribute holding the classification layer.
        dtype: dtype of the head; default: the dtype of the replaced layer (the compute dtype of a k-bit model).

    Returns:
        `model`, whose `head_name` is now an [`MSLRClassificationHead`] on the old layer's device.

    Raises:
        ValueError: `model` has no `nn.Linear` called `head_name`.

    Example:
        >>> from transformers import LlamaConfig, LlamaForSequenceClassification
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_labels=3, pad_token_id=0)
        >>> model = add_mslr_classification_head(LlamaForSequenceClassification(cfg), hidden_to=8, seed=0)
        >>> tuple(model.score.out_proj.weight.shape)
        (3, 8)
    """
    old = getattr(model, head_name, None)
    if not isinstance(old, nn.Linear):
        raise ValueError(
            f"head_name {head_name!r}: {type(model).__name__} has no nn.Linear of that name "
            f"(found {type(old).__name__}); pass the classification layer's attribute name."
        )
    dtype = dtype or old.weight.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    generator_state = torch.random.get_rng_state() if seed is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    try:
        head = MSLRClassificationHead(old.in_features, old.out_features, hidden_to, dropout)
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    setattr(model, head_name, head.to(device=old.weight.device, dtype=dtype))
    return model


def head_state_dict(model: nn.Module, head_name: str = SCORE_NAME) -> dict[str, torch.Tensor]:
    """The classification head's frozen base weights, keyed as in the unwrapped base model (`score.dense.weight`).

    Works on the base model and on a PEFT-wrapped one (adapter factors are left out: they live in the adapter).

    Example:
        >>> from transformers import LlamaConfig, LlamaForSequenceClassification
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_labels=2, pad_token_id=0)
        >>> model = add_mslr_classification_head(LlamaForSequenceClassification(cfg), seed=0)
        >>> sorted(head_state_dict(model))
        ['score.dense.weight', 'score.out_proj.weight']
    """
    result: dict[str, torch.Tensor] = {}
    prefix = f"{head_name}."
    for name, tensor in model.state_dict().items():
        for strip in ("base_model.model.", ""):
            if name.startswith(strip + prefix):
                key = name[len(strip) :].replace(".base_layer.", ".")
                if "musclelora_" in key or "lora_" in key:
                    break
                result[key] = tensor.detach().clone().contiguous()
                break
    return result


def llama_musclelora_config(
    target: str = "head",
    *,
    body_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    r: int = 2,
    lora_alpha: float = 8,
    head_scales: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0),
    head_r: int = 1,
    head_alpha: float = 4,
    init_weights: Any = True,
    **kwargs: Any,
) -> Any:
    """One [`MuScleLoraConfig`] with the published Llama-2 recipe: LoRA on the body, MSLR on the head.

    Args:
        target: `"head"`: MSLR on `score.dense` (after [`add_mslr_classification_head`], the reference); `"score"`:
            MSLR directly on the unchanged `score` layer.
        body_modules: Body modules with plain LoRA (scales [1]).
        r: LoRA rank on the body (2 published).
        lora_alpha: LoRA alpha on the body (8 published).
        head_scales: MSLR scales on the head ([1, 2, 3, 4] published).
        head_r: MSLR inner rank per scale on the head (1 published).
        head_alpha: MSLR alpha on the head (4 published).
        init_weights: Init of every adapter's factors (True: B = 0, a no-op at start). The reference initialises
            the head's MSLR factors Kaiming-uniform; for that, call
            `module.reset_musclelora_parameters("default", "kaiming")` on the head after `get_peft_model` (the
            benchmark runner does), or pass `init_weights="kaiming"` for every module.
        **kwargs: More `MuScleLoraConfig` fields (e.g. `lora_dropout`).

    Returns:
        The config; `task_type` is left unset, so PEFT neither trains nor wraps `score` (the reference freezes the
        head at its random initialisation; save it with [`head_state_dict`]).

    Example:
        >>> cfg = llama_musclelora_config()
        >>> cfg.target_modules == {"q_proj", "v_proj", "score.dense"}
        True
        >>> cfg.scale_pattern
        {'score.dense': [1.0, 2.0, 3.0, 4.0]}
    """
    if target not in ("head", "score"):
        raise ValueError(f"target must be 'head' (score.dense) or 'score', got {target!r}.")
    head = f"{SCORE_NAME}.dense" if target == "head" else SCORE_NAME
    return body_and_head_config(
        body_modules,
        head,
        r=r,
        lora_alpha=lora_alpha,
        head_scales=head_scales,
        head_r=head_r,
        head_alpha=head_alpha,
        init_weights=init_weights,
        **kwargs,
    )


def body_and_head_config(
    body_modules: Sequence[str],
    head: Optional[str] = None,
    *,
    r: int,
    lora_alpha: float,
    head_scales: Sequence[float] = (1.0, 2.0, 3.0, 4.0),
    head_r: int = 1,
    head_alpha: float = 4,
    init_weights: Any = True,
    **kwargs: Any,
) -> MuScleLoraConfig:
    """The one builder of "an adapter on the body plus MSLR on one module": plain LoRA (scales [1]) on
    `body_modules` and, when `head` is given, the multi-scale adapter (`head_scales`, `head_r`, `head_alpha`) on the
    module(s) that `head` names. The benchmark's classifier and instruction cells and [`llama_musclelora_config`]
    all build their config here.

    Args:
        body_modules: Target-module names with plain LoRA.
        head: The module (name suffix) with MSLR; None: plain LoRA only (as a `MuScleLoraConfig`).
        r: LoRA rank on the body.
        lora_alpha: LoRA alpha on the body.
        head_scales: MSLR scales on the head.
        head_r: MSLR inner rank per scale on the head.
        head_alpha: MSLR alpha on the head.
        init_weights: Init of every adapter's factors (True: B = 0); see [`reset_head_factors`] for the head alone.
        **kwargs: More `MuScleLoraConfig` fields (`task_type`, `lora_dropout`, ...).

    Example:
        >>> cfg = body_and_head_config(["query", "value"], "pooler.dense", r=8, lora_alpha=32, head_scales=[1, 2])
        >>> sorted(cfg.target_modules), cfg.scale_pattern, cfg.rank_pattern
        (['pooler.dense', 'query', 'value'], {'pooler.dense': [1.0, 2.0]}, {'pooler.dense': 1})
    """
    patterns: dict[str, Any] = {}
    if head is not None:
        patterns = {
            "scale_pattern": {head: [float(k) for k in head_scales]},
            "rank_pattern": {head: head_r},
            "alpha_pattern": {head: head_alpha},
        }
    return MuScleLoraConfig(
        target_modules=[*body_modules, *([head] if head is not None else [])],
        r=r,
        lora_alpha=lora_alpha,
        scales=[1.0],
        init_weights=init_weights,
        **patterns,
        **kwargs,
    )


def module_matches(name: str, suffix: str) -> bool:
    """Whether the module called `name` is the one `suffix` names (the whole name or its last dotted parts).

    Example:
        >>> module_matches("bert.pooler.dense", "pooler.dense"), module_matches("bert.pooler.xdense", "dense")
        (True, False)
    """
    return name == suffix or name.endswith("." + suffix)


def reset_head_factors(model: nn.Module, head: str, init: Any, adapter_name: str = "default") -> int:
    """Re-initialise the MSLR factors of every MuScleLoRA layer that `head` names (`init`: True for B = 0, False
    for random, "kaiming" for the reference's Kaiming-uniform); returns how many layers were reset."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, MuScleLoraLayer) and module_matches(name, head):
            with torch.no_grad():
                module.reset_musclelora_parameters(adapter_name, init)
            count += 1
    return count
