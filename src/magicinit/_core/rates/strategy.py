"""What every gradient-norm strategy is (``GradientNormStrategy``) and what they share: the noise draws of
one measurement (``NoiseDraws``), the outputs the noise is put on, and the refusal of a strategy that cannot
measure a model (``StrategyRefused``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from ..adapters import Layout
from ..context import PassContext
from ..errors import MagicInitError
from ..inputs import floating_tensors
from ..sites import WeightUnit
from .norms import DrawNorms, squared_filter_norms, squared_slice_norms


class GradientNormStrategy(Protocol):
    """A way of getting the squared gradient norms of every draw (``choose.choose_strategy`` picks one).

    Every strategy draws the same noise, in the same order, from its ``NoiseDraws``, so all give the same
    estimate; they differ in cost and in the models they can measure.
    """

    description: str  # how the norms are computed, as the report says it

    def rounds(self) -> Iterator[DrawNorms]:
        """One round: the norms of every draw, in order, under fresh noise (in groups of consecutive draws)."""
        ...

    def close(self) -> None:
        """Let go of what is held between rounds."""
        ...


class StrategyRefused(MagicInitError):
    """A strategy cannot measure this model (the message says why); the next one is taken. A
    ``MagicInitError`` so that it passes the forward's wrapper of the model's own errors unchanged; never
    raised to users."""


class NoiseDraws:
    """The draws of one change-rate measurement, as every strategy sees them: the pass's context, the
    weights measured (their units, filter layouts and slices of input channels), and the generator their
    Gaussian noise comes from."""

    def __init__(
        self,
        context: PassContext,
        units: dict[str, WeightUnit],
        layouts: dict[str, Layout],
        slices: dict[str, tuple[int, ...]],
        generator: torch.Generator | None,
    ) -> None:
        self.context, self.units, self.layouts, self.slices = context, units, layouts, slices
        self.generator = generator
        self.names = list(units)

    def noise(self, shapes: list[torch.Size], count: int) -> list[list[Tensor]]:
        """For each of ``count`` draws in order, float32 noise of every output shape (on the CPU
        generator's stream, so every strategy draws the same numbers)."""
        return [
            [torch.randn(shape, generator=self.generator, dtype=torch.float32) for shape in shapes]
            for _ in range(count)
        ]

    def gradient_norms(self, grads: list[Tensor | None]) -> DrawNorms:
        """The norms of one draw from every weight's gradient (None: no gradient reached it)."""
        model, channel, slices = self.context.model, {}, {}
        for name, grad in zip(self.names, grads):
            adapter, groups = self.layouts[name]
            weight = self.units[name].tensor(model)
            if grad is None:
                channel[name] = weight.new_zeros(1, adapter.out_channels(weight, groups), dtype=torch.float64)
            else:
                channel[name] = squared_filter_norms(adapter.to_filters(grad, groups)).reshape(1, -1)
            if name in self.slices:
                sizes = self.slices[name]
                slices[name] = (
                    squared_slice_norms(grad, sizes)
                    if grad is not None
                    else torch.zeros(len(sizes), dtype=torch.float64, device=weight.device)
                ).reshape(1, -1)
        return DrawNorms(1, channel, slices)

    def noise_state(self) -> Tensor:
        """The state of the generator the noise comes from (torch's global one where there is none)."""
        return self.generator.get_state() if self.generator is not None else torch.get_rng_state()

    def restore_noise_state(self, state: Tensor) -> None:
        """Put the noise generator back to ``state`` (from ``noise_state``): the next draws repeat."""
        if self.generator is not None:
            self.generator.set_state(state)
        else:
            torch.set_rng_state(state)


def output_tensors(output: object) -> list[Tensor]:
    """The tensors of the model's ``output`` that the noise is put on: the floating ones with a gradient
    (an error that says what to pass where there are none)."""
    tensors = [t for t in floating_tensors(output) if t.requires_grad]
    if tensors:
        return tensors
    if not any(True for _ in floating_tensors(output)):
        raise MagicInitError(
            f"the model's output ({type(output).__name__}) holds no floating tensor magicinit can find (it looks "
            "into tensors, tuples, lists, dicts and dataclasses); pass forward=lambda model, batch: ... returning "
            "the output tensor (e.g. model(batch).logits)"
        )
    raise MagicInitError(
        f"the model's output ({type(output).__name__}) does not depend on any initialized weight (no floating "
        "output with a gradient); pass forward=... returning the network's output tensor"
    )
