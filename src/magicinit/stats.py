"""Per-channel moments that merge exactly across batches (and, later, processes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ChannelMoments", "coefficient_of_variation"]


@dataclass(frozen=True)
class ChannelMoments:
    """Count, mean and sum of squared deviations of every channel.

    The standard deviation is the population one (``correction=0``): the
    spread of the values the init data actually produced.
    """

    count: int
    mean: Tensor
    sum_sq_dev: Tensor

    @classmethod
    def of(cls, values: Tensor, reduce_dims: tuple[int, ...]) -> "ChannelMoments":
        """Moments of ``values`` over ``reduce_dims``, computed in float32 or better."""
        if values.dtype not in (torch.float32, torch.float64):
            values = values.float()
        var, mean = torch.var_mean(values, dim=reduce_dims, correction=0)
        count = values.numel() // max(mean.numel(), 1)
        return cls(count, mean, var * count)

    def merge(self, other: "ChannelMoments") -> "ChannelMoments":
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
