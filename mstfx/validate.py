"""Checks of user-given counts, shared by the options, the planner and the runtime ops (no imports: every
layer may use them without pulling in another)."""

from __future__ import annotations

import numbers
from typing import Any


def is_positive_int(value: Any) -> bool:
    """An integer ≥ 1 (bools and floats are not): the one test behind every count mstfx accepts."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1


def positive_int(name: str, value: Any, *, cap: int | None = None) -> int:
    """``value`` as an int, or a ValueError that names ``name`` (bools and floats are refused)."""
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if cap is not None and value > cap:
        raise ValueError(
            f"{name}={value} is more than {cap} mini-sequences: chunks this short only add per-chunk "
            "overhead; use a plan (mstfx.plan / mstfx.transform) or a smaller M"
        )
    return int(value)
