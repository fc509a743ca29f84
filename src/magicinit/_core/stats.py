"""Per-channel moments that merge exactly across batches (and, later, processes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ChannelMoments:
    """Count, mean and sum of squared deviations of every channel.

    The standard deviation is the population one (``correction=0``): the
    spread of the values the init data actually produced.
    """

    count: int | Tensor  # a Tensor (per channel) only for ``concat``'s result
    mean: Tensor
    sum_sq_dev: Tensor

    @classmethod
    def concat(cls, parts: list[ChannelMoments]) -> ChannelMoments:
        """The channels of several moments side by side (each with its own count)."""
        counts = [
            torch.full_like(p.mean, float(p.count)) if not isinstance(p.count, Tensor) else p.count for p in parts
        ]
        return cls(torch.cat(counts), torch.cat([p.mean for p in parts]), torch.cat([p.sum_sq_dev for p in parts]))

    @classmethod
    def of(cls, view: Tensor, in_place: bool = False) -> ChannelMoments:
        """Moments of a float32/float64 ``(outer, channels, inner)`` view (see ``AffineAdapter.channel_view``).

        Three fast passes (sum, subtract the mean, norm), each reducing the
        contiguous inner dimension first: several times faster on CPU than
        ``torch.var_mean`` over the channel's dimensions. Centring before the
        norm keeps the variance free of cancellation. With ``in_place`` the
        view itself is left centred (no copy); otherwise it is unchanged.
        """
        count = view.shape[0] * view.shape[2]
        mean = view.sum(2).sum(0) / count
        centred = view.sub_(mean.view(1, -1, 1)) if in_place else view - mean.view(1, -1, 1)
        sum_sq_dev = torch.linalg.vector_norm(centred, 2, dim=2).square().sum(0)
        return cls(count, mean, sum_sq_dev)

    def merge(self, other: ChannelMoments) -> ChannelMoments:
        """Exact moments of the union of both samples (Chan et al.'s update)."""
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / total)
        sum_sq_dev = self.sum_sq_dev + other.sum_sq_dev + delta.square() * (self.count * other.count / total)
        return ChannelMoments(total, mean, sum_sq_dev)

    @property
    def var(self) -> Tensor:
        """Population variance per channel."""
        return self.sum_sq_dev / self.count

    @property
    def std(self) -> Tensor:
        """Population standard deviation per channel."""
        return self.var.clamp_min(0).sqrt()


def coefficient_of_variation(values: Tensor) -> float:
    """std / |mean| of a vector (population std); inf for a zero mean, 0 for one value."""
    values = values.double()
    if values.numel() < 2:
        return 0.0
    mean = values.mean().abs().item()
    std = values.std(correction=0).item()
    return std / mean if mean > 0 else float("inf")
