"""Part 3 of the method: how a layer's filters are first drawn.

A sampler is a function ``(request) -> filters`` that returns a float32 CPU
tensor of shape ``request.shape == (groups, out_per_group, fan_in)``. Part 1
then rescales and shifts every output channel, so a sampler only chooses the
filters' directions. Samplers are looked up by name in ``SAMPLERS``; adding
one is one entry (see ``register_sampler``).

Random draws use ``request.generator`` on the CPU and are then copied to the
layer's device, so that one seed gives the same weights on every device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import MagicInitError

__all__ = ["SamplerRequest", "Sampler", "SAMPLERS", "register_sampler", "get_sampler"]


@dataclass(frozen=True)
class SamplerRequest:
    """What a sampler may look at to draw one layer's filters.

    Attributes:
        name: qualified module name of the layer.
        module: the layer.
        shape: ``(groups, out_per_group, fan_in)``, the shape to return.
        current: the layer's present filters (float32, CPU).
        layer_input: the positional arguments of the layer's call on the init
            data, with all earlier layers already initialized (for samplers
            that draw filters from the data).
        generator: the random generator to draw from (None: torch's global one).
    """

    name: str
    module: nn.Module
    shape: torch.Size
    current: Tensor
    layer_input: tuple[Any, ...]
    generator: torch.Generator | None


Sampler = Callable[[SamplerRequest], Tensor]

SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str) -> Callable[[Sampler], Sampler]:
    """Decorator that adds a sampler to ``SAMPLERS`` under ``name``."""

    def add(sampler: Sampler) -> Sampler:
        SAMPLERS[name] = sampler
        return sampler

    return add


def get_sampler(name: str) -> Sampler:
    """The sampler registered as ``name``; a clear error lists the known names."""
    try:
        return SAMPLERS[name]
    except KeyError:
        known = ", ".join(sorted(SAMPLERS))
        raise MagicInitError(f"sampler={name!r} is not known; choose one of: {known}") from None


@register_sampler("gaussian")
def gaussian(request: SamplerRequest) -> Tensor:
    """I.i.d. standard normal filters (the reference's ``elwise``)."""
    return torch.randn(request.shape, generator=request.generator)


@register_sampler("orthogonal")
def orthogonal(request: SamplerRequest) -> Tensor:
    """Orthonormal filters within each group (rows, or columns when there are more rows).

    Drawn as the Q factor of a Gaussian matrix with the signs of R's diagonal
    folded in, which makes Q uniformly (Haar) distributed.
    """
    groups, rows, cols = request.shape
    tall = rows >= cols
    gaussian_matrix = torch.randn(groups, max(rows, cols), min(rows, cols), generator=request.generator)
    q, r = torch.linalg.qr(gaussian_matrix)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q if tall else q.transpose(-2, -1)


@register_sampler("keep")
def keep(request: SamplerRequest) -> Tensor:
    """The weights the layer already has; Part 1 then only rescales and shifts them."""
    return request.current.clone()
