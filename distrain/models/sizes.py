"""Checks of the sizes a model config gives: a width of 0 builds a model that trains to a
constant without an error, and a string iterates as one layer per letter, so each is refused
here with the value named (the driver reports it as a configuration error)."""

from __future__ import annotations

import numbers
from typing import Any


def is_count(value: Any) -> bool:
    """A whole number >= 1: a Python or numpy integer, not a bool (which Python counts as one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def check_count(name: str, value: Any, meaning: str) -> None:
    if not is_count(value):
        raise ValueError(f"{name} must be a whole number >= 1 ({meaning}), got {value!r}")


def check_widths(name: str, values: Any, meaning: str) -> None:
    if isinstance(values, str) or not all(is_count(v) for v in values):
        raise ValueError(f"{name} must be a list of whole numbers >= 1 ({meaning}), got {values!r}")


def check_dropout(value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"model.dropout must be in [0, 1) (a probability of zeroing), got {value}")
