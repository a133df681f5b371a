"""The one place `--set KEY=VALUE` strings are parsed: into typed values, by the type of the field they name.

The CLI calls [`parse_set_items`] once per command; everything below it ([`peft_musclelora.benchmark.spec`], the
method registry, the runner) takes the typed [`SetItems`]. A key is the name of a leaf field of a preset
([`peft_musclelora.benchmark.settings.settable_fields`]: adapter, training, gradient-alignment and row-filter fields),
optionally prefixed by its section (`adapter.r`, `training.min_ref_loss`), or `<method>.<field>` for one method only:
a preset field for a preset or baseline (`full.learning_rate=5e-5`), an option of a defense (`onion.frr=0.1`).

Example:
    >>> items = parse_set_items(["r=4", "onion.frr=0.1", "full.learning_rate=5e-5"])
    >>> items.common, items.per_method
    ({'r': 4}, {'onion': {'frr': 0.1}, 'full': {'learning_rate': 5e-05}})
"""

from __future__ import annotations

import difflib
import json
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from .methods import get_method, method_names
from .settings import MethodPreset, settable_fields


def preset_fields() -> dict[str, tuple[tuple[str, ...], Any]]:
    """Every key `--set` accepts for a preset: leaf name -> (path in [`MethodPreset`], type)."""
    return settable_fields(MethodPreset)


def override_keys() -> list[str]:
    """Every key `--set` accepts for a preset."""
    return list(preset_fields())


def split_item(item: str) -> tuple[str, str]:
    """`"key=value"` -> `("key", "value")`, stripped; a `ValueError` for an item without `=` or with an empty key."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set: expected key=value, got {item!r}.")
    return key.strip(), value.strip()


def locate(key: str, fields: Optional[dict[str, tuple[tuple[str, ...], Any]]] = None) -> str:
    """The leaf field a preset key names (`adapter.r` -> `r`); a `ValueError` with a close match if none."""
    fields = preset_fields() if fields is None else fields
    sections, _, name = key.rpartition(".")
    if name in fields:
        path = fields[name][0][:-1]
        given = tuple(sections.split(".")) if sections else ()
        if path[: len(given)] == given:
            return name
        raise ValueError(f"--set: unknown key {key!r}; valid keys: {', '.join(fields)}.")
    close = difflib.get_close_matches(name, list(fields), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"--set: unknown key {key!r}{hint}; valid keys: {', '.join(fields)}.")


def parse_fields(items: Iterable[tuple[str, str]], cls: type, what: str = "") -> dict[str, Any]:
    """Typed `{leaf: value}` for `(key, raw)` pairs naming leaf fields of the dataclass `cls` (later pairs win)."""
    fields = settable_fields(cls)
    out: dict[str, Any] = {}
    for key, raw in items:
        name = locate(key, fields)
        out[name] = parse_value(f"{what}{key}", raw, fields[name][1])
    return out


def parse_preset_items(items: Optional[Iterable[str]]) -> dict[str, Any]:
    """Typed preset overrides from `--set` items of a command that runs one preset (`train`, `presets`, `analyze`):
    every key names a preset field (a `<method>.` prefix is refused as an unknown key)."""
    return parse_fields([split_item(item) for item in items or ()], MethodPreset)


@dataclass(frozen=True)
class SetItems:
    """`--set` items, parsed: typed values for every method (`common`) and for one method (`per_method`).

    `items` keeps the strings as given (recorded in a cell's `metrics.json`, never parsed again below the CLI).
    """

    items: tuple[str, ...] = ()
    common: dict[str, Any] = field(default_factory=dict)
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    common_items: tuple[str, ...] = ()
    method_items: dict[str, dict[str, str]] = field(default_factory=dict)

    def recorded(self, method: str, trusted: Optional[int] = None) -> list[str]:
        """The strings a cell of `method` is recorded with: every-method items, the trusted size, its own items."""
        own = [f"{method}.{key}={value}" for key, value in self.method_items.get(method, {}).items()]
        size = [] if trusted is None else [f"reference_split_size={trusted}"]
        return [*self.common_items, *size, *own]


def parse_set_items(items: Optional[Iterable[str]]) -> SetItems:
    """Parse `--set` items once: preset fields by their type, `<defense>.<field>` by the defense's option types.

    Raises a one-line `ValueError` on a malformed item, an unknown key or a value of the wrong type.
    """
    items = tuple(items or ())
    names = set(method_names())
    common: list[tuple[str, str]] = []
    common_items: list[str] = []
    raw: dict[str, dict[str, str]] = {}
    for item in items:
        key, value = split_item(item)
        prefix, dot, name = key.partition(".")
        if dot and prefix in names:
            raw.setdefault(prefix, {})[name] = value
        else:
            common.append((key, value))
            common_items.append(item)
    per_method: dict[str, dict[str, Any]] = {}
    for method, pairs in raw.items():
        options = get_method(method).options
        if options is None:
            per_method[method] = parse_fields(pairs.items(), MethodPreset)
            continue
        settable = settable_fields(options)
        for name in pairs:
            if name not in settable:
                raise ValueError(f"--set {method}.{name}: unknown field; {method} takes {', '.join(settable)}.")
        per_method[method] = {
            name: parse_value(f"{method}.{name}", value, settable[name][1]) for name, value in pairs.items()
        }
    return SetItems(items, parse_fields(common, MethodPreset), per_method, tuple(common_items), raw)


_NONE = ("none", "null")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_value(key: str, raw: str, hint: Any) -> Any:
    """Parse the string `raw` as the type `hint` (int, float, bool, str, Literal, Optional, Union, list); `ValueError`
    if not.

    Lists are JSON (`[1, 2, 3]`) or comma-separated (`query,value`); `none`/`null` gives None for Optional fields.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        if raw.strip().lower() in _NONE and type(None) in args:
            return None
        for option in inner[:-1]:  # Union[bool, str]: the first type that parses the text
            try:
                return parse_value(key, raw, option)
            except ValueError:
                continue
        return parse_value(key, raw, inner[-1])
    bad = ValueError(f"--set {key}={raw!r}: expected {getattr(hint, '__name__', None) or hint}.")
    if origin is Literal:
        if raw not in args:
            raise ValueError(f"--set {key}={raw!r}: expected one of {list(args)}.")
        return raw
    if origin is list:
        (item_type,) = args
        text = raw.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise bad from None
            if not isinstance(items, list):
                raise bad
            items = [str(item) for item in items]
        else:
            items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise ValueError(f"--set {key}={raw!r}: expected a non-empty list.")
        return [parse_value(key, item, item_type) for item in items]
    if hint is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"--set {key}={raw!r}: expected true or false.")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise bad from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise bad from None
    if hint is str:
        return raw
    raise bad
