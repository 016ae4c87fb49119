"""Argument checks shared by the public entry points (messages name the argument)."""

from __future__ import annotations


def require_int(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [minimum, maximum]; else a ValueError."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name}: expected an integer >= {minimum}{upper}, got {value!r}")
    return value
