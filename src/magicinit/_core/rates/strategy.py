"""What every gradient-norm strategy is (``GradientNormStrategy``) and what they share: the noise draws of
one measurement (``NoiseDraws``), the outputs the noise is put on, and the refusal of a strategy that cannot
measure a model (``StrategyRefused``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..adapters import Layout
from ..context import PassContext
from ..errors import MagicInitError
from ..inputs import floating_tensors, split_batch
from ..safety import temporary_hooks
from ..sites import WeightUnit
from .norms import DrawNorms, squared_filter_norms, squared_slice_norms


class GradientNormStrategy(Protocol):
    """A way of getting the squared gradient norms of every draw (``choose.choose_strategy`` picks one).

    Every strategy draws the same noise, in the same order, from its ``NoiseDraws``, so all give the same
    estimate; they differ in cost and in the models they can measure.
    """

    description: str  # how the norms are computed, as the report says it

    def rounds(self, draws: Sequence[int] | None = None) -> Iterator[DrawNorms]:
        """One round: the norms of every draw (``draws``: of those draws only, by index, in that order), in
        order, under fresh noise (in groups of consecutive draws)."""
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
    noise comes from."""

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
        """For each of ``count`` draws in order, float32 Rademacher noise (each entry -1 or +1 with equal
        odds) of every output shape (on the CPU generator's stream, so every strategy draws the same numbers).

        Its second moment is that of standard Gaussian noise (``E[eta eta^T] = I``), so the expected squared
        gradient norm, hence the change rate, is the same; its variance is lower: for one sample,
        ``||J^T eta||^2`` varies by ``2 (||M||_F^2 - sum_i M_ii^2)`` against ``2 ||M||_F^2`` (``M = J J^T``),
        and a layer next to the output (``M`` diagonal) gets its exact norm from a single draw."""
        return [
            [
                torch.randint(0, 2, shape, generator=self.generator, dtype=torch.float32).mul_(2).sub_(1)
                for shape in shapes
            ]
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
        "output with a gradient: does the forward switch gradients off, with torch.no_grad() or "
        "torch.inference_mode()?); pass forward=... returning the network's output tensor, computed with "
        "gradients on"
    )


def check_gradients_reach_output(context: PassContext, units: dict[str, WeightUnit]) -> None:
    """Raise ``MagicInitError`` where the model's output on the first chunk of the init data carries no
    gradient, saying why: the layers of ``units`` that ran with gradients off inside the forward (a forward
    decorated with ``torch.no_grad()`` or ``torch.inference_mode()``), or else ``output_tensors``' reasons.

    Checked with one forward pass of one chunk before any strategy runs, so that none of them meets such a
    forward first and fails in its own terms. A layer that ran with gradients on at least once gets them.
    """
    grad_modes: dict[str, list[bool]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            grad_modes.setdefault(name, []).append(torch.is_grad_enabled())

        return hook

    with temporary_hooks() as hooks, torch.enable_grad():
        for name, unit in units.items():
            hooks.before(context.model.get_submodule(unit.owner), record(name))
        output = context.run(split_batch(context.batch, 0, context.rates.chunk_size))
    floating = list(floating_tensors(output))
    if any(t.requires_grad for t in floating):
        return
    without = [name for name, modes in grad_modes.items() if not any(modes)]
    if without:
        shown = ", ".join(f"'{name}'" for name in without[:5]) + (", ..." if len(without) > 5 else "")
        what = f"layer(s) {shown} ran with gradients switched off inside the forward"
    elif any(t.is_inference() for t in floating):
        what = "the forward computed it in inference mode (its output is an inference tensor)"
    else:
        output_tensors(output)  # raises why there is no output with a gradient
        return
    raise MagicInitError(
        f"the model's output carries no gradient from its weights: {what} (a forward decorated with "
        "@torch.no_grad() or @torch.inference_mode(), or such a block around the layers). Part 2 of init_ and "
        "rescale_, and diagnose, measure change rates by back-propagating noise to the weights, which needs "
        "gradients (magicinit runs Part 1 without them itself): remove the decorator, or pass forward=lambda "
        "model, batch: ... that calls the layers with gradients on; init_(..., between=False) runs Part 1 "
        "alone, which works with this forward"
    )
