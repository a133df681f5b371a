"""The specification of one cell, resolved once from a method, the parsed `--set` items and the trusted-row count.

[`resolve_cell`] turns a method name and [`SetItems`] into a [`CellSpec`]: the preset the cell trains (with typed
overrides), the defense's typed options and, for a defense, the undefended `lora` cell it builds on. Everything
below the CLI takes a `CellSpec`; nothing here reads a string. [`CellSpec.settings`] is the JSON that identifies a
cell: two runs whose settings are equal train the same cell, whatever the order or spelling of their `--set` items.

Precedence, lowest first: the bench preset's items (`--preset quick`), the run's items for every method, the curve's
trusted-row count, the method's own items (`<method>.<field>=value`).

Example:
    >>> from peft_musclelora.benchmark.overrides import parse_set_items
    >>> spec = resolve_cell("clean-only", parse_set_items(["num_train_epochs=2", "clean_only_epochs=5"]))
    >>> spec.trains, spec.preset.training.num_train_epochs, spec.settings()["preset"]["training"]["num_train_epochs"]
    ('lora', 2.0, 5.0)
    >>> resolve_cell("lora", parse_set_items(["r=4"]), trusted=32).preset.training.ga.reference_split_size
    32
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from .methods import get_method
from .overrides import SetItems
from .presets import get_preset
from .settings import MethodPreset


@dataclass(frozen=True)
class CellSpec:
    """One cell's resolved settings.

    Args:
        method: The bench method (see `peft_musclelora.benchmark.methods`).
        trains: The preset its training uses.
        overrides: Typed overrides of that preset.
        defense: The defense's typed options (empty for other methods).
        undefended_overrides: For a method that builds on the undefended `lora` cell: that cell's overrides.
        items: The `--set` strings the cell is recorded with (`bench_overrides` in `metrics.json`).
    """

    method: str
    trains: str
    overrides: dict[str, Any] = field(default_factory=dict)
    defense: dict[str, Any] = field(default_factory=dict)
    undefended_overrides: Optional[dict[str, Any]] = None
    items: tuple[str, ...] = ()

    @property
    def preset(self) -> MethodPreset:
        """The preset the cell trains with."""
        return get_preset(self.trains, self.overrides)

    @property
    def undefended(self) -> Optional[MethodPreset]:
        """The preset of the undefended `lora` cell a defense builds on (None for other methods)."""
        return None if self.undefended_overrides is None else get_preset("lora", self.undefended_overrides)

    def settings(self) -> dict[str, Any]:
        """Everything the cell trains and defends with, as JSON values (the `cell_settings` of `metrics.json`)."""
        method = get_method(self.method)
        settings: dict[str, Any] = {"method": self.method, "preset": method.identity(self.preset).to_dict()}
        if method.options is not None:
            settings["defense"] = dict(self.defense)
        if self.undefended is not None:
            settings["undefended"] = self.undefended.to_dict()
        return json.loads(json.dumps(settings, default=str))  # the values a metrics.json reads back


def resolve_cell(method: str, items: SetItems, trusted: Optional[int] = None) -> CellSpec:
    """The [`CellSpec`] of a cell of `method` under the parsed `items` (and the curve's `trusted` row count).

    Raises a `ValueError` for an unknown method or a value a preset or defense refuses.
    """
    entry = get_method(method)
    size = {} if trusted is None else {"reference_split_size": trusted}
    own = items.per_method.get(method, {})
    if entry.options is not None:
        overrides, defense = {**items.common, **size}, dict(own)
    else:
        overrides, defense = {**items.common, **size, **own}, {}
    undefended = None
    if entry.options is not None:  # a defense: the undefended cell is the bench's own `lora` cell
        undefended = {**items.common, **items.per_method.get("lora", {})}
    spec = CellSpec(method, entry.trains, overrides, defense, undefended, tuple(items.recorded(method, trusted)))
    spec.preset, spec.undefended  # noqa: B018  (resolving them checks every value now, not after training)
    return spec


def check_methods(methods: list[str], items: SetItems) -> None:
    """Fail early, before anything trains: every method asked for and every method named by a `<method>.` item
    must resolve."""
    for name in dict.fromkeys([*methods, *items.per_method]):
        resolve_cell(name, items)
