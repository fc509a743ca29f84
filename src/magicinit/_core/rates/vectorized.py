"""The vectorized strategy (``Vectorized``): per-sample gradients of many samples in one pass,
``torch.func.vmap`` of ``torch.func.grad`` over a noise loss."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.func import grad as gradient_of

from ..context import PassContext
from ..inputs import Batch, batch_size, floating_tensors, map_tensors, select_batch, split_batch
from .chunks import OneChunkAtATime
from .norms import BLOCK_FLOATS, DrawNorms
from .strategy import NoiseDraws


class Vectorized:
    """Per-sample gradients of many samples in one pass (``torch.func.vmap`` of ``grad``).

    Used when the strategy from site activations is not possible (a weight used by
    another operation, or through a view, samples that interact) but the
    forward can be vectorized (no data-dependent Python control flow, no random
    operations, no ``.item()``).
    """

    description = "vectorized per-sample gradients"

    def __init__(
        self, draws: NoiseDraws, output_shapes: list[torch.Size], fallback: OneChunkAtATime, stop: int | None = None
    ) -> None:
        """``output_shapes``: one sample's outputs the noise is put on; ``fallback``: the strategy for a block
        the vectorized pass fails on; ``stop``: measure only the samples before it (a trial)."""
        self.draws, self.output_shapes, self.fallback = draws, output_shapes, fallback
        context = draws.context
        self.parameters = {name: unit.tensor(context.model).detach() for name, unit in draws.units.items()}
        size = max(1, sum(p.numel() for p in self.parameters.values()))
        self.count = batch_size(context.batch) if stop is None else stop
        self.block = max(1, min(self.count, BLOCK_FLOATS // size))
        self.loss = _NoiseLoss(context)
        self.qualified = {name: f"model.{unit.parameters[0]}" for name, unit in draws.units.items()}
        first = next(iter(self.parameters.values()))
        self.device, self.dtype = first.device, first.dtype

    def sample_loss(self, weights: dict[str, Tensor], sample: Batch, noise: list[Tensor]) -> Tensor:
        """One sample's noise loss, with ``weights`` in place of the model's."""
        batch = map_tensors(lambda t: t.unsqueeze(0), sample)
        swapped = {self.qualified[name]: weight for name, weight in weights.items()}
        return functional_call(self.loss, swapped, (batch, noise))

    def rounds(self, draws: Sequence[int] | None = None, strict: bool = False) -> Iterator[DrawNorms]:
        """One round (``draws``: of those samples only, by index, in that order), a block of samples at a
        time. A block the vectorized pass fails on (a sample taking another path) is done by the fallback, a
        draw at a time (``strict``: the failure is raised)."""
        noise_draws, indices = self.draws, list(range(self.count)) if draws is None else list(draws)
        for start in range(0, len(indices), self.block):
            rows = indices[start : start + self.block]
            batch = noise_draws.context.batch
            contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
            samples = split_batch(batch, rows[0], rows[0] + len(rows)) if contiguous else select_batch(batch, rows)
            count = len(rows)
            noise = noise_draws.noise(self.output_shapes, count)
            stacked = [
                torch.stack([n[k] for n in noise]).to(device=self.device, dtype=self.dtype)
                for k in range(len(self.output_shapes))
            ]
            try:
                with torch.no_grad():  # the gradients are values here, not part of an outer graph
                    grads = vmap(gradient_of(self.sample_loss), in_dims=(None, 0, 0), randomness="error")(
                        self.parameters, samples, stacked
                    )
            except Exception:
                if strict:
                    raise
                yield from (self.fallback.norms(sample) for sample in rows)
                continue
            yield DrawNorms.concatenated(
                [noise_draws.gradient_norms([grads[name][i] for name in noise_draws.names]) for i in range(count)]
            )

    def close(self) -> None:
        """Nothing held between rounds."""


class _NoiseLoss(nn.Module):
    """``sum(noise . output)`` of ``forward(model, batch)``, as a module ``functional_call`` can give weights to."""

    def __init__(self, context: PassContext) -> None:
        super().__init__()
        self.model = context.model
        self.run_forward = context.forward

    def forward(self, batch: Batch, noise: list[Tensor]) -> Tensor:
        outputs = list(floating_tensors(self.run_forward(self.model, batch)))
        return torch.stack([(output * n).sum() for output, n in zip(outputs, noise)]).sum()
