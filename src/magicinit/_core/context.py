"""What every pass of the method works with: the model, its data, the randomness, the processes, the options."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import Collective
from .inputs import Batch, ForwardFn
from .options import RateOptions, ScaleOptions
from .stopwatch import Stopwatch


@dataclass(frozen=True, eq=False)
class PassContext:
    """What one call's passes over the init data share.

    Attributes:
        model: the user's model (changed in place by Parts 1 and 2).
        batch: the init data as one batch on the model's device.
        forward: ``forward(model, batch)``, its failures turned into ``MagicInitError``.
        generator: the random generator (None: torch's global one); the same on every rank.
        collective: the processes whose statistics are reduced together (None: this one alone).
        progress: show tqdm progress bars.
        rates: how change rates are estimated.
        scaling: how Part 2 may rescale.
        stopwatch: where the call's time goes (``Stopwatch.stage``).
    """

    model: nn.Module
    batch: Batch
    forward: ForwardFn
    generator: torch.Generator | None
    collective: Collective | None
    progress: bool
    rates: RateOptions
    scaling: ScaleOptions = ScaleOptions()
    stopwatch: Stopwatch = field(default_factory=Stopwatch)

    def run(self, batch: Batch | None = None) -> Any:
        """The model's output on ``batch`` (default: all the init data)."""
        return self.forward(self.model, self.batch if batch is None else batch)

    @contextmanager
    def progress_bar(self, total: int, desc: str, unit: str) -> Iterator[Callable[[int], None]]:
        """A function that advances a tqdm bar (a no-op unless ``progress``); the bar closes with the block."""
        if not self.progress:
            yield lambda steps: None
            return
        bar = tqdm(total=total, desc=desc, unit=unit)
        try:
            yield bar.update
        finally:
            bar.close()
