"""`MuScleLoraConfig`: LoRA-compatible fields, normalisation, and one clear error per invalid value."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from peft import LoraConfig, get_peft_model

from peft_musclelora import MUSCLELORA_PEFT_TYPE, MuScleLoraConfig

from .conftest import make_mlp

LORA_FIELDS_KEPT = {
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "fan_in_fan_out",
    "bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "trainable_token_indices",
}


def test_field_names_are_those_of_lora_config() -> None:
    mslr_fields = {f.name for f in dataclasses.fields(MuScleLoraConfig)}
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}

    assert LORA_FIELDS_KEPT <= mslr_fields & lora_fields
    assert all(f.metadata.get("help") for f in dataclasses.fields(MuScleLoraConfig) if f.name in LORA_FIELDS_KEPT)


def test_defaults_and_normalisation() -> None:
    config = MuScleLoraConfig(scales=(1, 2, 4), scale_pattern={"lin0": [3]}, target_modules=["lin0", "lin1"])

    assert config.peft_type is MUSCLELORA_PEFT_TYPE
    assert config.scales == [1.0, 2.0, 4.0]
    assert all(isinstance(scale, float) for scale in config.scales)
    assert config.scale_pattern == {"lin0": [3.0]}
    assert config.target_modules == {"lin0", "lin1"}
    assert config.total_rank == 3 * config.r
    assert MuScleLoraConfig().init_weights is True


def test_use_rslora_reads_as_absent() -> None:
    config = MuScleLoraConfig()

    assert getattr(config, "use_rslora", False) is False
    assert not hasattr(config, "use_rslora")
    assert "use_rslora" not in config.to_dict()


INVALID: list[Any] = [
    # (kwargs, error type, regex the message must match: the field and the offending value)
    ({"scales": []}, ValueError, r"`scales` must hold at least one scale, got an empty list"),
    ({"scales": [1.0, 0]}, ValueError, r"`scales` must hold finite positive numbers, got 0 in \[1.0, 0\]"),
    ({"scales": [-2.0]}, ValueError, r"`scales` must hold finite positive numbers, got -2.0"),
    ({"scales": [math.nan]}, ValueError, r"`scales` must hold finite positive numbers, got nan"),
    ({"scales": [math.inf]}, ValueError, r"`scales` must hold finite positive numbers, got inf"),
    ({"scales": "1,2,4"}, TypeError, r"`scales` must be a list of positive numbers, got '1,2,4'"),
    ({"scales": 2.0}, TypeError, r"`scales` must be a list of positive numbers, got 2.0"),
    ({"scales": {1.0, 2.0}}, TypeError, r"`scales` must be a list of positive numbers, got \{1.0, 2.0\}"),
    ({"scales": [1, "2"]}, TypeError, r"`scales` must hold numbers, got '2'"),
    ({"scales": [True]}, TypeError, r"`scales` must hold numbers, got True"),
    ({"r": 0}, ValueError, r"`r` must be an integer >= 1, got 0"),
    ({"r": -3}, ValueError, r"`r` must be an integer >= 1, got -3"),
    ({"r": 2.0}, TypeError, r"`r` must be an integer >= 1, got 2.0"),
    ({"r": "8"}, TypeError, r"`r` must be an integer >= 1, got '8'"),
    ({"lora_alpha": math.nan}, TypeError, r"`lora_alpha` must be a finite number, got nan"),
    ({"lora_alpha": "16"}, TypeError, r"`lora_alpha` must be a finite number, got '16'"),
    ({"lora_dropout": 1.0}, ValueError, r"`lora_dropout` must be in \[0, 1\), got 1.0"),
    ({"lora_dropout": -0.1}, ValueError, r"`lora_dropout` must be in \[0, 1\), got -0.1"),
    ({"lora_dropout": "0.1"}, TypeError, r"`lora_dropout` must be a finite number, got '0.1'"),
    ({"init_weights": "gaussian"}, ValueError, r"`init_weights` must be True, False or 'kaiming', got 'gaussian'"),
    ({"init_weights": None}, ValueError, r"`init_weights` must be True, False or 'kaiming', got None"),
    ({"bias": "lora_only"}, ValueError, r"`bias` must be 'none', 'all' or 'musclelora_only', got 'lora_only'"),
    ({"layers_pattern": "layers"}, ValueError, r"`layers_pattern` is 'layers' but `layers_to_transform` is None"),
    (
        {"target_modules": r".*\.q", "layers_to_transform": [0]},
        ValueError,
        r"`layers_to_transform` cannot be used when `target_modules` is a regex string",
    ),
    ({"scale_pattern": [1, 2]}, TypeError, r"`scale_pattern` must be a dict of regex -> list of scales, got \[1, 2\]"),
    ({"scale_pattern": {"q": []}}, ValueError, r"`scale_pattern\['q'\]` must hold at least one scale"),
    (
        {"scale_pattern": {"q": [0.5, -1]}},
        ValueError,
        r"`scale_pattern\['q'\]` must hold finite positive numbers, got -1",
    ),
    (
        {"scale_pattern": {"q": "1 2"}},
        TypeError,
        r"`scale_pattern\['q'\]` must be a list of positive numbers, got '1 2'",
    ),
    ({"rank_pattern": ["q"]}, TypeError, r"`rank_pattern` must be a dict of regex -> value, got \['q'\]"),
    ({"rank_pattern": {"q": 0}}, ValueError, r"`rank_pattern\['q'\]` must be an integer >= 1, got 0"),
    ({"rank_pattern": {"q": 1.5}}, TypeError, r"`rank_pattern\['q'\]` must be an integer >= 1, got 1.5"),
    ({"alpha_pattern": None}, TypeError, r"`alpha_pattern` must be a dict of regex -> value, got None"),
    ({"alpha_pattern": {"q": "x"}}, TypeError, r"`alpha_pattern\['q'\]` must be a finite number, got 'x'"),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    INVALID,
    ids=[",".join(f"{k}={v!r}" for k, v in case[0].items()) for case in INVALID],
)
def test_invalid_value_raises_naming_field_and_value(kwargs: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        MuScleLoraConfig(**kwargs)


# PEFT itself warns about unmatched rank/alpha pattern keys before MuScleLoRA turns them into an error.
@pytest.mark.filterwarnings("ignore:The following .* keys did not match any targeted module:RuntimeWarning")
@pytest.mark.parametrize("field_name", ["scale_pattern", "rank_pattern", "alpha_pattern"])
def test_pattern_key_matching_no_adapted_module_is_an_error_at_injection(field_name: str) -> None:
    values = {"scale_pattern": [1, 2], "rank_pattern": 2, "alpha_pattern": 3}
    config = MuScleLoraConfig(
        target_modules=["lin0", "lin1"], **{field_name: {"lin0": values[field_name], "nope": values[field_name]}}
    )

    with pytest.raises(ValueError, match=rf"`{field_name}` keys \['nope'\].*Adapted modules: \['lin0', 'lin1'\]"):
        get_peft_model(make_mlp(), config)


def test_pattern_key_matching_only_an_excluded_module_is_an_error() -> None:
    config = MuScleLoraConfig(target_modules=["lin0"], scale_pattern={"lin1": [1, 3]})

    with pytest.raises(ValueError, match=r"`scale_pattern` keys \['lin1'\]"):
        get_peft_model(make_mlp(), config)
