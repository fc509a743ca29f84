"""Adapters: how each family of affine maps lays out its filters and output channels.

Every step of the method works on *filters*: a tensor of shape
``(groups, out_channels // groups, fan_in)`` with one row per output channel,
in the order of the map's output channels. An adapter converts a weight to
that view and back, and says where the output channels sit in the output.
The families: convolutions (weight ``(out, in/groups, *kernel)``, channels on
output dimension 1), transposed convolutions (weight ``(in, out/groups,
*kernel)``), linear maps (weight ``(out, in)``, channels last) and matrix
products with the weight on the right (weight ``(in, out)``: GPT-2's
``Conv1D``, ``x @ W``, ``addmm(b, x, W)``; channels last).

``ADAPTERS`` also lists the module types whose weight is affine (for the
layers a forward pass never calls, which only their type reveals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class AffineAdapter:
    """Filter view and output-channel layout of one family of affine maps.

    Attributes:
        transposed: the weight holds output channels on dimension 1 (transposed convolutions).
        weight_in_out: the weight is ``(in, out)`` (a matrix product ``x @ W``).
        channels_last_in_output: output channels are the last dimension of the output
            (linear maps, matrix products) rather than dimension 1 (convolutions).
    """

    transposed: bool = False
    weight_in_out: bool = False
    channels_last_in_output: bool = False

    def out_channels(self, weight: Tensor, groups: int = 1) -> int:
        """Number of output channels of ``weight``."""
        if self.weight_in_out:
            return weight.shape[-1]
        return weight.shape[1] * groups if self.transposed else weight.shape[0]

    def to_filters(self, weight: Tensor, groups: int = 1) -> Tensor:
        """``weight`` as filters ``(groups, out_per_group, fan_in)`` (a view or a copy)."""
        if self.weight_in_out:
            return weight.t().reshape(1, weight.shape[1], weight.shape[0])
        if not self.transposed:
            return weight.reshape(groups, weight.shape[0] // groups, -1)
        in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
        kernel = math.prod(weight.shape[2:])
        grouped = weight.reshape(groups, in_per_group, out_per_group, kernel)
        return grouped.permute(0, 2, 1, 3).reshape(groups, out_per_group, in_per_group * kernel)

    def from_filters(self, filters: Tensor, shape: tuple[int, ...], groups: int = 1) -> Tensor:
        """Inverse of ``to_filters``: a tensor of the weight's ``shape``."""
        if self.weight_in_out:
            return filters.reshape(shape[1], shape[0]).t().contiguous()
        if not self.transposed:
            return filters.reshape(shape)
        in_per_group, out_per_group = shape[0] // groups, shape[1]
        kernel = math.prod(shape[2:])
        grouped = filters.reshape(groups, out_per_group, in_per_group, kernel)
        return grouped.permute(0, 2, 1, 3).reshape(shape)

    def channel_view(self, output: Tensor) -> Tensor:
        """A contiguous output viewed as ``(outer, channels, inner)``, the output channels in the middle."""
        if self.channels_last_in_output:
            return output.view(-1, output.shape[-1], 1)
        return output.view(output.shape[0], output.shape[1], -1)


Layout = tuple[AffineAdapter, int]  # a weight's filter layout and its groups

CONV = AffineAdapter()
CONV_TRANSPOSE = AffineAdapter(transposed=True)
LINEAR = AffineAdapter(channels_last_in_output=True)
MATMUL = AffineAdapter(weight_in_out=True, channels_last_in_output=True)

ADAPTERS: dict[type[nn.Module], AffineAdapter] = {
    nn.Conv1d: CONV,
    nn.Conv2d: CONV,
    nn.Conv3d: CONV,
    nn.ConvTranspose1d: CONV_TRANSPOSE,
    nn.ConvTranspose2d: CONV_TRANSPOSE,
    nn.ConvTranspose3d: CONV_TRANSPOSE,
    nn.Linear: LINEAR,
}


def module_adapter(module: nn.Module) -> AffineAdapter | None:
    """The adapter of ``module``'s type (subclasses included), or None if its type is not in ``ADAPTERS``."""
    for cls in type(module).__mro__:
        if cls in ADAPTERS:
            return ADAPTERS[cls]
    return None


def find_affine_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All modules of ``model`` whose type is in ``ADAPTERS``, by qualified name, in registration order."""
    return {name: module for name, module in model.named_modules() if module_adapter(module) is not None}
