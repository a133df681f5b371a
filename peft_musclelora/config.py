"""Configuration of the multi-scale low-rank (MSLR) adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from ._checks import check_int, check_number
from .peft_type import MUSCLELORA_PEFT_TYPE

InitWeights = Union[bool, Literal["kaiming"]]


class LoraOnlyFeatureError(AttributeError, ValueError):
    """A LoRA-only PEFT utility asked a [`MuScleLoraConfig`] for a LoRA field it does not have.

    It is a `ValueError` for the caller that hit it, and an `AttributeError` so that `getattr(config, name, default)`
    and `hasattr` still see the field as absent.
    """


def _validate_scales(field_name: str, scales: object) -> list[float]:
    # Sets and dicts are refused too: branch j of the stacked factors belongs to the j-th scale, so order matters.
    if isinstance(scales, (str, bytes, set, frozenset, dict)) or not hasattr(scales, "__iter__"):
        raise TypeError(f"`{field_name}` must be a list of positive numbers, got {scales!r}.")
    values = list(scales)
    if not values:
        raise ValueError(f"`{field_name}` must hold at least one scale, got an empty list.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`{field_name}` must hold numbers, got {value!r} in {values!r}.")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"`{field_name}` must hold finite positive numbers, got {value!r} in {values!r}.")
    return [float(value) for value in values]


def _validate_positive_number(field_name: str, value: object) -> None:
    # lora_alpha scales the adapter's output: 0 trains an adapter that changes nothing, a negative value flips it.
    check_number(field_name, value)
    if value <= 0:  # type: ignore[operator]
        raise ValueError(f"`{field_name}` must be a finite number > 0, got {value!r}.")


@dataclass
class MuScleLoraConfig(PeftConfig):
    """Configuration of a MuScleLoRA (multi-scale low-rank) adapter, the config of a [`MuScleLoraModel`].

    Paper: https://arxiv.org/abs/2402.12026 (MuScleLoRA, ACL 2024).

    The field names are those of [`peft.LoraConfig`] wherever the meaning is the same, so a LoRA script switches to
    MuScleLoRA by changing the class name. Every targeted linear map `y = W0 x + b0` becomes

        y = W0 x + b0 + (lora_alpha / r) * sum_j B_j A_j (k_j * x)

    with one rank-`r` branch per scale `k_j`. With `scales=[1.0]` the adapter is exactly LoRA. The fields of
    [`peft.PeftConfig`] (`task_type`, `inference_mode`, `base_model_name_or_path`, ...) are inherited unchanged.
    [`bert_musclelora_config`] builds the published BERT / RoBERTa recipe from these fields.

    Args:
        r (`int`, *optional*, defaults to `8`):
            Rank of each scale's branch, an integer >= 1. A module holds `len(scales) * r` rank-one components in
            total (see [`total_rank`]). `rank_pattern` overrides it per module.
        lora_alpha (`float`, *optional*, defaults to `8`):
            Scaling numerator, a finite number > 0: the summed branches are multiplied by `lora_alpha / r` (the `r`
            of the module, after `rank_pattern`). There is no rank-stabilised variant (`use_rslora`).
            `alpha_pattern` overrides it per module.
        lora_dropout (`float`, *optional*, defaults to `0.0`):
            Dropout probability in [0, 1) on the adapter's input, shared by all branches; the base layer sees the
            input without dropout. Applies to every adapted module.
        scales (`list[float]`, *optional*, defaults to `[1.0, 2.0, 4.0, 8.0]`):
            The radial scales `k_j`: branch `j` sees `k_j * x`. Finite numbers > 0, in order (branch `j` of the
            stacked factors belongs to the `j`-th scale, so sets and dicts are refused); stored as floats. `[1.0]`
            gives plain LoRA. `scale_pattern` overrides it per module.
        scale_pattern (`dict[str, list[float]]`, *optional*, defaults to `{}`):
            Per-module `scales`, keyed by module-name regex and matched like `rank_pattern`, e.g.
            `{"pooler.dense": [1, 2, 3, 4, 5, 6, 7, 8, 9]}`. Each value is checked like `scales`.
        target_modules (`Optional[Union[list[str], str]]`, *optional*, defaults to `None`):
            The modules to adapt, as in LoRA: a list of names (exact match or name suffix; stored as a set) or one
            regex string matched against the full module name. `"all-linear"` adapts every linear layer except the
            output layer. `None` uses PEFT's LoRA defaults for the architecture (`query` and `value` for BERT) and
            fails for an unknown one. The targets must be `torch.nn.Linear`, transformers' `Conv1D` or bitsandbytes
            `Linear4bit` / `Linear8bitLt` layers; any other type is a `TypeError` naming the module.
        exclude_modules (`Optional[Union[list[str], str]]`, *optional*, defaults to `None`):
            Modules never to adapt, even if `target_modules` matches them: names (stored as a set) or a regex, as in
            LoRA.
        fan_in_fan_out (`bool`, *optional*, defaults to `False`):
            `True` when the target stores its weight as `(in, out)`, like GPT-2's `Conv1D`. It is corrected per
            module, with a warning, when it disagrees with the layer type (`True` for `Conv1D`, `False` for linear
            layers).
        bias (`Literal["none", "all", "musclelora_only"]`, *optional*, defaults to `"none"`):
            Which biases train: `"none"`, `"all"` (every bias of the model) or `"musclelora_only"` (the biases of the
            adapted layers). With `"all"` or `"musclelora_only"` the disabled adapter no longer gives the base
            model's output, since the trained biases stay.
        modules_to_save (`Optional[list[str]]`, *optional*, defaults to `None`):
            Modules besides the adapters to train and save, e.g. a classification head. With
            `task_type="SEQ_CLS"` PEFT adds the model's head (`classifier` / `score`) by itself.
        init_weights (`Union[bool, Literal["kaiming"]]`, *optional*, defaults to `True`):
            `True` draws `A` Kaiming-uniform and sets `B = 0`, so the adapter is a no-op at creation (LoRA's
            init); `"kaiming"` draws both factors Kaiming-uniform, as the method's reference implementation does;
            `False` leaves both at `torch.nn.Linear`'s random init (for tests). Applies to every adapted module.
        layers_to_transform (`Optional[Union[list[int], int]]`, *optional*, defaults to `None`):
            Indices of the layers to adapt (one index or a list); all layers when `None`. Cannot be combined with a
            regex string as `target_modules`.
        layers_pattern (`Optional[Union[list[str], str]]`, *optional*, defaults to `None`):
            Name of the `nn.ModuleList` that `layers_to_transform` indexes, e.g. `"layer"` (BERT) or `"layers"`
            (Llama). Only valid together with `layers_to_transform`.
        rank_pattern (`dict[str, int]`, *optional*, defaults to `{}`):
            Per-module `r` (integers >= 1), keyed by module-name regex. A key matches a module when it matches a
            dotted suffix of the module's name (`(.*\\.)?(key)$`, as in LoRA); the first matching key wins. Unlike
            LoRA, a key of `rank_pattern`, `alpha_pattern` or `scale_pattern` that matches no adapted module is a
            `ValueError` when the adapter is created.
        alpha_pattern (`dict[str, float]`, *optional*, defaults to `{}`):
            Per-module `lora_alpha` (finite numbers > 0), keyed by module-name regex and matched like
            `rank_pattern`.
        trainable_token_indices (`Optional[Union[list[int], dict[str, list[int]]]]`, *optional*, defaults to `None`):
            Token indices of the embedding to train sparsely, as in LoRA: a list for the input embedding, or a dict
            from embedding-module name to indices. TRL sets it when it adds tokens to the vocabulary.

    Example:
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from peft_musclelora import MuScleLoraConfig
        >>> base = BertForSequenceClassification(
        ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        ...                vocab_size=100)
        ... )
        >>> config = MuScleLoraConfig(
        ...     task_type="SEQ_CLS",
        ...     r=8,
        ...     lora_alpha=32,
        ...     target_modules=["query", "value", "pooler.dense"],
        ...     scales=[1.0],
        ...     scale_pattern={"pooler.dense": [1, 2, 3, 4, 5, 6, 7, 8, 9]},
        ...     rank_pattern={"pooler.dense": 1},
        ...     alpha_pattern={"pooler.dense": 6},
        ... )
        >>> model = get_peft_model(base, config)
        >>> pooler = model.base_model.model.bert.pooler.dense
        >>> pooler.scales("default"), pooler.r["default"], pooler.scaling["default"]
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], 1, 6.0)
        >>> tuple(pooler.musclelora_A["default"].weight.shape)  # 9 scales x rank 1, input width 32
        (9, 32)
        >>> query = model.base_model.model.bert.encoder.layer[0].attention.self.query
        >>> query.scales("default"), query.r["default"], query.scaling["default"]  # plain LoRA r 8, alpha 32
        ([1.0], 8, 4.0)
    """

    r: int = field(default=8, metadata={"help": "Rank of each scale's branch (>= 1); rank_pattern overrides it."})
    lora_alpha: float = field(
        default=8,
        metadata={
            "help": "Scaling numerator (> 0): the branches' sum is multiplied by lora_alpha / r; alpha_pattern "
            "overrides it."
        },
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout probability in [0, 1) on the adapter input, shared by all branches."}
    )
    scales: list[float] = field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0],
        metadata={
            "help": "Radial scales k_j (> 0, in order): branch j sees k_j * x. [1.0] gives plain LoRA; "
            "scale_pattern overrides it."
        },
    )
    scale_pattern: dict[str, list[float]] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module scales overriding `scales`, keyed by module-name regex (matched like rank_pattern), "
            "e.g. {'pooler.dense': [1, 2, 3, 4, 5, 6, 7, 8, 9]}."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names or a regex to adapt; 'all-linear' adapts every linear layer but the output layer. "
            "When None, PEFT's LoRA defaults for the model architecture are used."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex never to adapt."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "True when the target stores its weight as (in, out), like GPT-2's Conv1D; corrected per module "
            "with a warning when it disagrees with the layer type."
        },
    )
    bias: Literal["none", "all", "musclelora_only"] = field(
        default="none",
        metadata={
            "help": "Which biases to train: 'none', 'all' (every bias) or 'musclelora_only' (the adapted layers')."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapters to train and save, e.g. a classification head."},
    )
    init_weights: InitWeights = field(
        default=True,
        metadata={
            "help": "True: B = 0 so the adapter starts as a no-op (LoRA's init). 'kaiming': both factors "
            "Kaiming-uniform (the reference implementation). False: both random (testing only)."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Indices of the layers to adapt; all layers when None. Not with a regex target_modules."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Name of the layer list that layers_to_transform indexes, e.g. 'layer' or 'layers'; only "
            "with layers_to_transform."
        },
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module rank overriding `r`, keyed by module-name regex (matched against a dotted suffix of "
            "the name; first match wins). A key matching no adapted module is an error."
        },
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Per-module alpha overriding `lora_alpha`, keyed by module-name regex (as rank_pattern)."},
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={"help": "Token indices of the embedding to train sparsely (as in LoraConfig); used by TRL."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MUSCLELORA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

        check_int("r", self.r)
        _validate_positive_number("lora_alpha", self.lora_alpha)
        check_number("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        self.scales = _validate_scales("scales", self.scales)

        if not isinstance(self.scale_pattern, dict):
            raise TypeError(f"`scale_pattern` must be a dict of regex -> list of scales, got {self.scale_pattern!r}.")
        self.scale_pattern = {
            key: _validate_scales(f"scale_pattern[{key!r}]", value) for key, value in self.scale_pattern.items()
        }
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"`{name}` must be a dict of regex -> value, got {getattr(self, name)!r}.")
        for key, value in self.rank_pattern.items():
            check_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _validate_positive_number(f"alpha_pattern[{key!r}]", value)

        if self.init_weights not in (True, False, "kaiming"):
            raise ValueError(f"`init_weights` must be True, False or 'kaiming', got {self.init_weights!r}.")
        if self.bias not in ("none", "all", "musclelora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'musclelora_only', got {self.bias!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"`layers_pattern` is {self.layers_pattern!r} but `layers_to_transform` is None: set both or neither."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex string.")

    @property
    def use_rslora(self) -> bool:
        # PEFT's LoRA hot-swapping (`peft.utils.hotswap.hotswap_adapter_from_state_dict`) reads `config.use_rslora`
        # without checking the PEFT type; answer with a clear refusal instead of a bare AttributeError.
        raise LoraOnlyFeatureError(
            "MuScleLoRA configs have no `use_rslora` (the scaling is always lora_alpha / r), so LoRA-only PEFT "
            "utilities such as hot-swapping (peft.utils.hotswap) do not support MuScleLoRA adapters. Load the "
            "adapters side by side with `load_adapter` and switch with `set_adapter` instead."
        )

    @property
    def total_rank(self) -> int:
        """Rank of the stacked adapter for the default scales: `len(scales) * r`."""
        return len(self.scales) * self.r


def bert_musclelora_config(
    *,
    body_modules: tuple[str, ...] = ("query", "value"),
    head: str = "pooler.dense",
    r: int = 8,
    lora_alpha: float = 32,
    head_scales: tuple[float, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9),
    head_r: int = 1,
    head_alpha: float = 6,
    task_type: Optional[str] = "SEQ_CLS",
    **kwargs: Any,
) -> MuScleLoraConfig:
    """One [`MuScleLoraConfig`] with the published BERT / RoBERTa recipe: LoRA on the body, MSLR on the pooler.

    Plain LoRA (scales `[1]`) on `body_modules` and the multi-scale adapter on `head`, as the MuScleLoRA paper trains
    BERT-large and RoBERTa-large. The Llama-2 counterpart is `peft_musclelora.heads.llama_musclelora_config`.

    Args:
        body_modules: Body modules with plain LoRA.
        head: The module with the multi-scale adapter (`pooler.dense` for BERT; RoBERTa has no pooler in its
            sequence classifier, use `classifier.dense`).
        r: LoRA rank on the body (8 published).
        lora_alpha: LoRA alpha on the body (32 published).
        head_scales: MSLR scales on `head` (1..9 published).
        head_r: MSLR rank per scale on `head` (1 published).
        head_alpha: MSLR alpha on `head` (6 published).
        task_type: PEFT task type; `"SEQ_CLS"` trains and saves the classifier through `modules_to_save`, `None`
            leaves it frozen at its initialisation (as the reference does).
        **kwargs: More `MuScleLoraConfig` fields, e.g. `init_weights="kaiming"` (the reference's init) or
            `lora_dropout`.

    Example:
        >>> bert_musclelora_config() == MuScleLoraConfig(
        ...     task_type="SEQ_CLS",
        ...     r=8,
        ...     lora_alpha=32,
        ...     target_modules=["query", "value", "pooler.dense"],
        ...     scales=[1.0],
        ...     scale_pattern={"pooler.dense": [1, 2, 3, 4, 5, 6, 7, 8, 9]},
        ...     rank_pattern={"pooler.dense": 1},
        ...     alpha_pattern={"pooler.dense": 6},
        ... )
        True
        >>> bert_musclelora_config(init_weights="kaiming").init_weights
        'kaiming'
    """
    return MuScleLoraConfig(
        task_type=task_type,
        r=r,
        lora_alpha=lora_alpha,
        target_modules=[*body_modules, head],
        scales=[1.0],
        scale_pattern={head: [float(k) for k in head_scales]},
        rank_pattern={head: head_r},
        alpha_pattern={head: head_alpha},
        **kwargs,
    )
