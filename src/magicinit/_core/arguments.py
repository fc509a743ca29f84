"""The checks of option values: ``check(name, value)`` returns the value to use or raises.

Each option of ``options.py`` names one of these; a bad value raises
``InvalidOption`` (a ``MagicInitError``) naming the argument, the value and
what it must be, before the data is read or the model touched. A good one is
returned as the value to use: numpy numbers become Python ints and floats, so
that reports stay JSON-able.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

from .errors import MagicInitError

SEED_RANGE = (0, 2**63 - 1)  # what every process can share as an int64

Check = Callable[[str, Any], Any]  # (name, value) -> the value to use, or MagicInitError


class InvalidOption(MagicInitError):
    """A bad option value; ``expected`` says what it must be (the command line words its own message with it)."""

    def __init__(self, message: str, expected: str) -> None:
        super().__init__(message)
        self.expected = expected

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (str(self), self.expected)


def _refuse(name: str, value: Any, expected: str) -> InvalidOption:
    shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:57]}..."
    return InvalidOption(f"{name}={shown}: {expected}", expected)


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


def seed_integer(name: str, value: Any) -> int:
    """An integer every process can share (a seed where None is no choice: the command line)."""
    low, high = SEED_RANGE
    if not is_integer(value) or not low <= value <= high:
        raise _refuse(name, value, f"must be an integer in [{low}, 2**63 - 1]")
    return int(value)


def names(name: str, value: Any) -> str | tuple[str, ...]:
    """A module or parameter name, or an iterable of them (read once, returned as a tuple)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, Iterable) or isinstance(value, (bytes, dict)):
        raise _refuse(name, value, "must be a name or a list of module or parameter names (() for none)")
    items = tuple(value)
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
    """None, or a callable that takes two positional arguments, ``(model, batch)`` (one whose signature
    cannot be read is taken as it is)."""
    if value is None:
        return value
    if not callable(value):
        raise _refuse(name, value, "must be None or a callable(model, batch) -> output")
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # a builtin or an extension type without a readable signature
        return value
    try:
        signature.bind(None, None)
    except TypeError as error:
        raise _refuse(
            name, value, f"must take two positional arguments, (model, batch), as lambda model, batch: ... ({error})"
        ) from None
    return value


def one_of(choices: tuple[str, ...]) -> Check:
    """One of ``choices``."""

    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _refuse(name, value, f"must be one of {', '.join(map(repr, choices))}")
        return value

    return check


def anything(name: str, value: Any) -> Any:
    """Any value: the option is checked where it is used (``process_group``)."""
    return value
