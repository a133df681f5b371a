"""Field checks shared by the library's typed arguments: each raises `TypeError` (wrong type) or `ValueError`
(out of range) naming the field, what is allowed and the value it got."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional


def check_bool(name: str, value: object) -> None:
    """`value` must be `True` or `False`."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")


def check_int(name: str, value: object, minimum: int = 1, optional: bool = False) -> None:
    """`value` must be an integer >= `minimum` (or None when `optional`); booleans are refused.

    Example:
        >>> check_int("r", 0)
        Traceback (most recent call last):
        ...
        ValueError: `r` must be an integer >= 1, got 0.
    """
    if optional and value is None:
        return
    allowed = f"{'None or ' if optional else ''}an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be {allowed}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def check_number(
    name: str,
    value: object,
    allowed: str = "",
    within: Optional[Callable[[float], bool]] = None,
    optional: bool = False,
) -> None:
    """`value` must be a finite number (or None when `optional`) for which `within` holds; `allowed` says which.

    Example:
        >>> check_number("max_raw_grad_ratio", 1.5, "in [0, 1]", lambda v: 0 <= v <= 1)
        Traceback (most recent call last):
        ...
        ValueError: `max_raw_grad_ratio` must be in [0, 1], got 1.5.
    """
    if optional and value is None:
        return
    none = "None or " if optional else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be {none}a finite number{' ' + allowed if allowed else ''}, got {value!r}.")
    if within is not None and not within(value):
        raise ValueError(f"`{name}` must be {none}{allowed}, got {value!r}.")
