"""Squared norms of gradients and weights, in float64: of output channels, of slices of input channels, and
of per-sample gradients ``g x^T`` from the Gram matrix of a sample's positions without forming them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK_FLOATS = 2**23  # per-sample gradient values held at once (32 MiB of float32)


@dataclass
class DrawNorms:
    """Squared gradient norms of consecutive draws, in float64 on the model's device.

    Attributes:
        count: the number of draws.
        channel: per weight, ``(count, output channels)``.
        slices: per weight measured by input slices, ``(count, slices)``.
    """

    count: int
    channel: dict[str, Tensor]
    slices: dict[str, Tensor]

    @staticmethod
    def concatenated(draws: list[DrawNorms]) -> DrawNorms:
        """The norms of ``draws`` (consecutive groups of draws, each with the same weights) as one group."""
        return DrawNorms(
            sum(d.count for d in draws),
            {name: torch.cat([d.channel[name] for d in draws]) for name in draws[0].channel},
            {name: torch.cat([d.slices[name] for d in draws]) for name in draws[0].slices},
        )


def sample_blocks(count: int, per_sample_floats: int) -> Iterator[slice]:
    """Consecutive blocks of ``count`` samples, each holding at most ``BLOCK_FLOATS`` values of
    ``per_sample_floats`` per sample (at least one sample)."""
    step = max(1, BLOCK_FLOATS // max(1, per_sample_floats))
    for start in range(0, count, step):
        yield slice(start, min(count, start + step))


def sum_over_slices(per_input: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """Sums over consecutive slices of the last dimension (input channels) of ``per_input``."""
    return torch.stack([part.sum(-1) for part in torch.split(per_input, list(sizes), dim=-1)], -1)


def squared_norms(tensor: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """``(tensor ** 2).sum(dim)`` in float64, from one pass of ``torch.linalg.vector_norm`` (summed in the
    tensor's precision, float32 at least: positive terms, accurate to ~1e-6, and far faster on a CPU than
    float64). A tensor whose norms leave [1e-15, 1e15] is divided by its largest magnitude first, so that
    values of 1e-30 or 1e30 neither underflow nor overflow."""
    work = tensor.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    norms = torch.linalg.vector_norm(work, dim=dim)
    if not work.numel() or 1e-15 <= float(norms.max()) <= 1e15:
        return norms.double().square()
    scale = float(work.abs().amax())
    if scale == 0.0 or not math.isfinite(scale):  # zeros, NaN or inf stay so
        return norms.double().square()
    return torch.linalg.vector_norm(work / scale, dim=dim).double().square() * (scale * scale)


def squared_slice_norms(tensor: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """Squared norms of consecutive slices of a weight-shaped ``tensor`` (a weight or its gradient)
    along the input channels (dimension 1), in float64."""
    return sum_over_slices(squared_norms(tensor, tuple(d for d in range(tensor.dim()) if d != 1)), sizes)


def squared_filter_norms(filters: Tensor) -> Tensor:
    """``||f||^2`` of every filter ``(..., fan_in)`` in float64 (``squared_norms``)."""
    return squared_norms(filters, -1)


# --- through the Gram matrix of a sample's positions ----------------------------------------------------


def gram_is_cheaper(positions: int, fan_in: int, outputs: int, device: torch.device) -> bool:
    """Whether a sample's norms cost less through the Gram matrix of its positions (``positions^2 *
    (fan_in + outputs)`` products in float64, each about two of float32 on a CPU) than by forming its
    gradient (``positions * outputs * fan_in``). On a GPU float64 runs at a small fraction of float32's
    speed, and the gradient is formed."""
    return device.type == "cpu" and positions > 1 and 2 * positions * (fan_in + outputs) < outputs * fan_in


def gram_floats(positions: int, fan_in: int, outputs: int, groups: int) -> int:
    """Floats (float32 units) held per sample by ``gram_norms``: the input columns in float32 and float64,
    the output gradient in float64 and its product with the Gram matrix, and the Gram matrix itself."""
    return positions * (3 * fan_in + 4 * outputs + 2 * groups * positions)


def gram_norms(rows_out: Tensor, rows_in: Tensor, sizes: tuple[int, ...] | None) -> tuple[Tensor, Tensor | None]:
    """Squared norms of per-sample gradients ``g x^T`` without forming them, in float64: with ``g``
    ``(n, groups, out, positions)`` and ``x`` ``(n, groups, fan_in, positions)``, row ``i`` of sample ``b``
    has ``||g_i x^T||^2 = g_i K g_i^T`` for the Gram matrix ``K = x^T x`` of the sample's positions. Returns
    the norms of every output channel ``(n, groups * out)`` and, for ``sizes`` (consecutive slices of the
    input channels, ungrouped), of every slice ``(n, slices)``."""
    g, x = rows_out.double(), rows_in.double()
    gram = x.transpose(-1, -2) @ x  # (n, groups, positions, positions)
    channel = ((g @ gram) * g).sum(-1).flatten(1).clamp_min(0.0)  # >= 0 but for rounding
    if sizes is None:
        return channel, None
    per_channel = x.shape[2] // sum(sizes)  # kernel positions per input channel
    outer = g[:, 0].transpose(-1, -2) @ g[:, 0]  # (n, positions, positions): sum over outputs of g_i^T g_i
    parts = torch.split(x[:, 0], [size * per_channel for size in sizes], dim=1)
    return channel, torch.stack(
        [((part.transpose(-1, -2) @ part) * outer).sum((-1, -2)) for part in parts], -1
    ).clamp_min(0.0)
