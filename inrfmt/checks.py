"""Argument checks shared by every public entry point: each raises InrUsageError naming the argument."""
from __future__ import annotations

import math
import numbers

from .errors import InrUsageError


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int within [minimum, maximum] (either bound optional)."""
    if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            bounds = f" in [{minimum}, {maximum}]"
        elif minimum is not None:
            bounds = f" >= {minimum}"
        else:
            bounds = ""
        raise InrUsageError(f"{name} must be an integer{bounds}, got {value!r}")
    return int(value)


def check_fraction(name: str, value, *, zero_ok: bool = True, what: str = "") -> float:
    """`value` as a float in [0, 1] ((0, 1] when not zero_ok); `what` says what the fraction counts."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and (0 <= value <= 1 if zero_ok else 0 < value <= 1)
    if not ok:
        interval = "[0, 1]" if zero_ok else "(0, 1]"
        raise InrUsageError(f"{name} must be in {interval}{f' ({what})' if what else ''}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise InrUsageError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
