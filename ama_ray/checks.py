"""Range and choice checks that config classes run in `__post_init__`: each failure is a
ConfigError naming the dotted key, so a bad job file fails when it is loaded."""

from __future__ import annotations

import math
from typing import Sequence

from ama_ray.errors import ConfigError


def check_number(key: str, value, *, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, integer: bool = False) -> None:
    """`value` must be a finite number in [low, high] ((low, high] with `low_open`), an int if `integer`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        lower = ("(" if low_open else "[") + (f"{low:g}" if math.isfinite(low) else "-inf")
        upper = (f"{high:g}]" if math.isfinite(high) else "inf)")
        kind = "an integer" if integer else "a finite number"
        raise ConfigError(f"{value!r} is not {kind} in {lower}, {upper}", where=key, fix="set it inside that range")


def check_choice(key: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown value {value!r}", where=key, fix=f"use one of {', '.join(choices)}")
