"""Checking the arguments of ``init_``, ``rescale_`` and ``diagnose`` before anything else happens.

Every keyword has one check in ``CHECKS``; a bad value raises ``MagicInitError``
naming the argument, the value and what it must be, before the data is read
or the model touched. A good one is returned as the value to use: numpy numbers
become Python ints and floats, so that reports stay JSON-able. The option
classes of ``context.py`` use the same checks.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

from .errors import MagicInitError

SEED_RANGE = (0, 2**63 - 1)  # what every process can share as an int64
MIN_RATE_ROUNDS = 2  # passes over the init data at least when estimating change rates: the noise error needs two

Check = Callable[[str, Any], Any]  # (name, value) -> the value to use, or MagicInitError


def _refuse(name: str, value: Any, expected: str) -> MagicInitError:
    shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:57]}..."
    return MagicInitError(f"{name}={shown}: {expected}")


def is_integer(value: Any) -> bool:
    """An int (or numpy integer) that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number (int, float, numpy scalar) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def flag(name: str, value: Any) -> bool:
    """True or False."""
    if not isinstance(value, bool):
        raise _refuse(name, value, "must be True or False")
    return value


def at_least(minimum: int) -> Check:
    """An integer of at least ``minimum``."""

    def check(name: str, value: Any) -> int:
        if not is_integer(value) or value < minimum:
            raise _refuse(name, value, f"must be an integer of at least {minimum}")
        return int(value)

    return check


def positive(name: str, value: Any) -> float:
    """A finite number above 0."""
    if not is_real(value) or not math.isfinite(value) or not value > 0:
        raise _refuse(name, value, "must be a finite number above 0")
    return float(value)


def finite(name: str, value: Any) -> float:
    """A finite number."""
    if not is_real(value) or not math.isfinite(value):
        raise _refuse(name, value, "must be a finite number")
    return float(value)


def fraction(name: str, value: Any) -> float:
    """A number in [0, 1)."""
    if not is_real(value) or not 0 <= value < 1:
        raise _refuse(name, value, "must be a number in [0, 1)")
    return float(value)


def seed(name: str, value: Any) -> int | None:
    """None, or an integer every process can share."""
    low, high = SEED_RANGE
    if value is not None and (not is_integer(value) or not low <= value <= high):
        raise _refuse(name, value, f"must be None or an integer in [{low}, 2**63 - 1]")
    return None if value is None else int(value)


def names(name: str, value: Any) -> str | list[str]:
    """A module or parameter name, or an iterable of them (read once, returned as a list)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, Iterable) or isinstance(value, (bytes, dict)):
        raise _refuse(name, value, "must be a name or a list of module or parameter names (() for none)")
    items = list(value)
    wrong = [item for item in items if not isinstance(item, str)]
    if wrong:
        raise _refuse(name, value, f"every entry must be a str; {wrong[0]!r} is a {type(wrong[0]).__name__}")
    return items


def sampler(name: str, value: Any) -> Any:
    """A registered sampler's name, or a callable."""
    if not isinstance(value, str) and not callable(value):
        raise _refuse(name, value, "must be a sampler's name (a str) or a callable(request) -> filters")
    return value


def optional_callable(name: str, value: Any) -> Any:
    """None, or a callable."""
    if value is not None and not callable(value):
        raise _refuse(name, value, "must be None or a callable(model, batch) -> output")
    return value


def scale_mode(name: str, value: Any) -> str:
    """One of the scale modes."""
    from .context import SCALE_MODES  # context uses these checks too

    if not isinstance(value, str) or value not in SCALE_MODES:
        raise _refuse(name, value, f"must be one of {', '.join(map(repr, SCALE_MODES))}")
    return value


CHECKS: dict[str, Check] = {
    "sampler": sampler,
    "within": flag,
    "between": flag,
    "beta": finite,
    "seed": seed,
    "samples": at_least(1),
    "forward": optional_callable,
    "skip": names,
    "include_frozen": flag,
    "progress": flag,
    "patch_budget_mb": positive,
    "rate_chunk_size": at_least(1),
    "rate_precision": positive,
    "rate_max_rounds": at_least(MIN_RATE_ROUNDS),
    "scale_mode": scale_mode,
    "scale_tolerance": fraction,
    "verify_rates": flag,
    "across_normalization": flag,
}


def check_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """Check every keyword in ``arguments`` that ``CHECKS`` knows (the model, data and process group
    are checked where they are used); the values to use, by keyword."""
    return {name: CHECKS[name](name, value) if name in CHECKS else value for name, value in arguments.items()}
