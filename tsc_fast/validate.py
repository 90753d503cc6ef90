"""Checks of user settings that fail at once with the setting's name and what it accepts.

A wrong setting must never be silently coerced (``rounds=1.5`` running 2 rounds, ``maximize="no"`` maximising):
each check accepts exactly the documented values and raises :class:`SettingError` (a ValueError) otherwise.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import numpy as np


class SettingError(ValueError):
    """A setting outside what it accepts; the message names the setting, the value and the allowed range."""


def _fail(name: str, value: Any, accepted: str) -> SettingError:
    return SettingError(f"{name} must be {accepted}, got {value!r}")


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None,
            allow_none: bool = False) -> int | None:
    """An integer (Python or numpy; not a bool, not a float) in [minimum, maximum]."""
    if value is None and allow_none:
        return None
    bounds = _range_text(minimum, maximum)
    accepted = f"an integer{bounds}" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(name, value, accepted)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(name, value, accepted)
    return int(value)


def real(name: str, value: Any, minimum: float | None = None, maximum: float | None = None,
         open_below: bool = False, open_above: bool = False, allow_none: bool = False) -> float | None:
    """A finite real number in the given (closed unless said open) interval (or None, when allowed)."""
    low = "-inf" if minimum is None else f"{minimum:g}"
    high = "inf" if maximum is None else f"{maximum:g}"
    accepted = f"a finite number in {'(' if open_below else '['}{low}, {high}{')' if open_above else ']'}"
    if value is None and allow_none:
        return None
    accepted += " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise _fail(name, value, accepted)
    number = float(value)
    if minimum is not None and (number < minimum or (open_below and number == minimum)):
        raise _fail(name, value, accepted)
    if maximum is not None and (number > maximum or (open_above and number == maximum)):
        raise _fail(name, value, accepted)
    return number


def boolean(name: str, value: Any) -> bool:
    """True or False (numpy bools too); never a truthy string or number."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise _fail(name, value, "True or False")


def choice(name: str, value: Any, options: Iterable[Any], allow_none: bool = False) -> Any:
    """One of ``options`` (or None when allowed)."""
    options = tuple(options)
    if (value is None and allow_none) or (value is not None and not isinstance(value, (list, dict))
                                          and value in options):
        return value
    listed = ", ".join(repr(o) for o in options) + (" or None" if allow_none else "")
    raise _fail(name, value, f"one of {listed}")


def _range_text(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""
