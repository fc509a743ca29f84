"""Where one call's time goes: wall seconds by stage (trace, Part 1, change rates, solve, checks, ...).

Stages nest: time spent in an inner stage counts toward it alone, so the exclusive times of all stages add up to
the time the stopwatch ran, and a stage's inclusive time is its own plus that of the stages inside it. On a CUDA
device the clock reads only after the device has finished its queued work (``torch.cuda.synchronize`` at every
stage boundary, a handful per call): without it a stage would be charged for its predecessor's kernels.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["Stopwatch"]


class Stopwatch:
    """Wall seconds of one call, by stage.

    Attributes:
        exclusive: per stage, the seconds spent in it and in no stage nested inside it.
        inclusive: per stage, the seconds between entering and leaving it (nested stages included; a stage
            entered again, e.g. once per round, adds up).
        parent: per stage, the stage it was first entered in (None at the top).
    """

    def __init__(self) -> None:
        self.exclusive: dict[str, float] = {}
        self.inclusive: dict[str, float] = {}
        self.parent: dict[str, str | None] = {}
        self._open: list[tuple[str, float]] = []  # the stages entered and not yet left, with their start
        self._mark = 0.0  # when time was last charged to the innermost open stage

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Charge the time spent inside the block to ``name`` (and not to the stage it is nested in)."""
        now = _clock()
        if self._open:
            self._charge(self._open[-1][0], now)
        self.parent.setdefault(name, self._open[-1][0] if self._open else None)
        self._open.append((name, now))
        self._mark = now
        try:
            yield
        finally:
            end = _clock()
            self._charge(name, end)
            _, start = self._open.pop()
            self.inclusive[name] = self.inclusive.get(name, 0.0) + end - start

    def _charge(self, name: str, now: float) -> None:
        self.exclusive[name] = self.exclusive.get(name, 0.0) + now - self._mark
        self._mark = now

    def children(self, name: str) -> dict[str, float]:
        """The inclusive seconds of the stages first entered inside ``name``, in the order they were entered."""
        return {child: self.inclusive[child] for child, parent in self.parent.items() if parent == name}


def _clock() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()
