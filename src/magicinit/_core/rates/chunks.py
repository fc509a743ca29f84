"""The strategy that measures every model: a forward and a backward per draw, a chunk of
``rate_chunk_size`` samples at a time (``OneChunkAtATime``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..inputs import batch_size, split_batch
from ..safety import Hooks
from ..sites import WeightUnit
from .norms import DrawNorms
from .strategy import NoiseDraws, output_tensors


class OneChunkAtATime:
    """A forward and a backward per draw (a chunk of ``rate_chunk_size`` samples): works for every model,
    reparametrized weights and random operations included."""

    description = "one sample at a time"

    def __init__(self, draws: NoiseDraws, hooks: Hooks) -> None:
        """``hooks``: where to register the pre-hooks that catch a reparametrized weight as each call of its
        module computes it (the caller removes them)."""
        self.draws = draws
        context, units = draws.context, draws.units
        self.starts = list(range(0, batch_size(context.batch), context.rates.chunk_size))
        self.computed: dict[str, list[Tensor]] = {}  # a reparametrized weight as each call of its module computed it
        for name, unit in units.items():
            if unit.kind != "parameter":  # after the reparametrization's own pre-hook: its result of this call
                hooks.before(context.model.get_submodule(unit.owner), self._keep_computed(name, unit))

    def _keep_computed(self, name: str, unit: WeightUnit) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        """The pre-hook that appends the weight of ``unit`` as its module's call computes it to ``computed``."""

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.computed.setdefault(name, []).append(getattr(module, unit.attribute))

        return hook

    def gradients(self, start: int) -> list[Tensor | None]:
        """The gradient of every weight for the chunk at ``start``, under fresh noise."""
        draws = self.draws
        context, units, names = draws.context, draws.units, draws.names
        chunk = split_batch(context.batch, start, start + context.rates.chunk_size)
        self.computed.clear()
        with torch.enable_grad():
            outputs = output_tensors(context.run(chunk))
            used = [
                self.computed.get(name, []) if units[name].kind != "parameter" else [units[name].tensor(context.model)]
                for name in names
            ]
            noise = [n.to(t) for n, t in zip(draws.noise([t.shape for t in outputs], 1)[0], outputs)]
            flat = torch.autograd.grad(outputs, [t for ts in used for t in ts], grad_outputs=noise, allow_unused=True)
        grads, position = [], 0
        for tensors in used:  # a weight's gradient: the sum over the calls that used it
            parts = [g for g in flat[position : position + len(tensors)] if g is not None]
            grads.append(None if not parts else parts[0] if len(parts) == 1 else torch.stack(parts).sum(0))
            position += len(tensors)
        return grads

    def norms(self, start: int) -> DrawNorms:
        """The norms of the draw of the chunk at ``start``, under fresh noise."""
        return self.draws.gradient_norms(self.gradients(start))

    def rounds(self, draws: Sequence[int] | None = None) -> Iterator[DrawNorms]:
        """One round: every draw (``draws``: those, by index), in order."""
        return map(self.norms, self.starts if draws is None else [self.starts[i] for i in draws])

    def close(self) -> None:
        """Nothing held between rounds."""
