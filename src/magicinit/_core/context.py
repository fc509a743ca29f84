"""What every pass of the method works with: the model, its data, the randomness, the processes, the options."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arguments import CHECKS
from .distributed import Collective
from .inputs import Batch, ForwardFn


@dataclass(frozen=True)
class RateOptions:
    """How change rates are estimated.

    The public functions take these as ``rate_<field>`` keywords (``rate_chunk_size``,
    ...), the command line as ``--rate-<field>``, and the report records them
    under the same keywords (``keywords()``).

    Attributes:
        chunk_size: samples per noise draw. One sample per draw is the steadiest
            for the cost: in a larger chunk the samples' gradients add up with
            random signs, which adds variance (the reference used batches of 16).
        precision: stop when the standard error of every ``log C_k`` is below this.
        max_rounds: passes over the init data at most.
    """

    chunk_size: int = field(default=1, metadata={"help": "samples per noise draw for the change rates"})
    precision: float = field(default=0.02, metadata={"help": "target standard error of each log change rate"})
    max_rounds: int = field(default=16, metadata={"help": "at most this many passes over the data per rate estimate"})

    def __post_init__(self) -> None:
        for name, value in self.keywords().items():
            CHECKS[name](name, value)

    def keywords(self) -> dict[str, Any]:
        """The options as the keywords of ``init_``/``rescale_``/``diagnose`` (``rate_chunk_size``, ...)."""
        return {f"rate_{f.name}": getattr(self, f.name) for f in fields(self)}


SCALE_MODES = ("exact", "approximate")


@dataclass(frozen=True)
class ScaleOptions:
    """How Part 2 may rescale (the ``scale_mode`` and ``scale_tolerance`` keywords).

    Attributes:
        mode: ``"exact"`` keeps the network's function (to rounding): every
            operation that is not homogeneous fixes the scales around it.
            ``"approximate"`` also rescales across operations that behave
            homogeneously on the init data within ``tolerance`` (LRN at small
            activations, GELU or tanh near their linear range, ...), in damped
            rounds of measure, solve, apply, until the rates agree; the output
            may then change slightly beyond a global scale (the report says how much).
        tolerance: in ``"approximate"`` mode, the largest relative deviation
            ``||f(r x) - r f(x)|| / ||r f(x)||`` (``r`` = 1/2 and 2, on the init data) of an
            operation tied, and the largest relative output change beyond one global factor
            that the rounds may cause (a step beyond it is undone and halved).
        max_rounds: rounds of measure-solve-apply at most in ``"approximate"`` mode.
        verify: measure the rates again after an exact rescaling. By default they are
            predicted: an exact rescaling moves every rate by a known factor (``"approximate"``
            mode always measures).
        across_normalization: also rescale the layers whose output a normalization layer
            (batch, layer, group, instance, RMS norm) normalizes, scaling its ``eps`` and
            running statistics to match. Off by default: such a layer's rate is then free, and
            Part 2 sets it to what the layers that are not normalized allow, which in a
            batch-norm net is the head's rate; that slowed every convolution and cost 11.6
            points in ``bench/train.py --experiment batch-norm``.
    """

    mode: str = "exact"
    tolerance: float = 0.05
    max_rounds: int = 6
    verify: bool = False
    across_normalization: bool = False

    def __post_init__(self) -> None:
        for name, value in (("scale_mode", self.mode), ("scale_tolerance", self.tolerance),
                            ("verify_rates", self.verify), ("across_normalization", self.across_normalization)):
            CHECKS[name](name, value)


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
    """

    model: nn.Module
    batch: Batch
    forward: ForwardFn
    generator: torch.Generator | None
    collective: Collective | None
    progress: bool
    rates: RateOptions
    scaling: ScaleOptions = ScaleOptions()

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
