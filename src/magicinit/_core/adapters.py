"""Adapters: how each family of affine layers exposes its filters and channels.

Every step of the method works on *filters*: a tensor of shape
``(groups, out_channels // groups, fan_in)`` with one row per output channel,
in the order of the layer's output channels. An adapter converts a layer's
weight to that view and back, and says where the output channels sit in the
layer's output. Adding a layer family is one entry in ``ADAPTERS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import MagicInitError


@dataclass(frozen=True)
class AffineAdapter:
    """Filter view and output-channel layout of one layer family.

    Attributes:
        transposed: the weight holds output channels on dimension 1 (transposed convolutions).
        channels_last_in_output: output channels are the last dimension of the output
            (``nn.Linear``) rather than dimension 1 (convolutions).
    """

    transposed: bool
    channels_last_in_output: bool

    def groups(self, module: nn.Module) -> int:
        """Number of groups (1 for layers without groups)."""
        return int(getattr(module, "groups", 1))

    def out_channels(self, module: nn.Module) -> int:
        """Number of output channels."""
        weight = module.weight
        if self.channels_last_in_output:
            return weight.shape[0]
        return weight.shape[1] * self.groups(module) if self.transposed else weight.shape[0]

    def to_filters(self, module: nn.Module, weight: Tensor | None = None) -> Tensor:
        """The weight as filters ``(groups, out_per_group, fan_in)`` (a view or a copy)."""
        weight = module.weight if weight is None else weight
        groups = self.groups(module)
        if not self.transposed:
            return weight.reshape(groups, weight.shape[0] // groups, -1)
        in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
        kernel = math.prod(weight.shape[2:])
        grouped = weight.reshape(groups, in_per_group, out_per_group, kernel)
        return grouped.permute(0, 2, 1, 3).reshape(groups, out_per_group, in_per_group * kernel)

    def from_filters(self, module: nn.Module, filters: Tensor) -> Tensor:
        """Inverse of ``to_filters``: a tensor shaped like the layer's weight."""
        shape = module.weight.shape
        if not self.transposed:
            return filters.reshape(shape)
        groups = self.groups(module)
        in_per_group, out_per_group = shape[0] // groups, shape[1]
        kernel = math.prod(shape[2:])
        grouped = filters.reshape(groups, out_per_group, in_per_group, kernel)
        return grouped.permute(0, 2, 1, 3).reshape(shape)

    def patches(self, module: nn.Module, layer_input: Tensor) -> Tensor | None:
        """The input patches each filter sees: ``(groups, patches, fan_in)``, or None if unsupported.

        A convolution's patches come from the layer itself run with identity
        filters (``_conv_forward``), so stride, padding and its mode, dilation
        and groups are those of the layer, in the filters' own element order.
        A linear layer's patches are its input rows. Transposed convolutions
        have no patches in this sense (None).
        """
        if self.transposed:
            return None
        weight = module.weight
        if self.channels_last_in_output:
            return layer_input.reshape(1, -1, weight.shape[1])
        groups = self.groups(module)
        fan = weight[0].numel()
        identity = torch.eye(fan, dtype=layer_input.dtype, device=layer_input.device)
        identity = identity.reshape(fan, *weight.shape[1:]).repeat(groups, *([1] * (weight.dim() - 1)))
        columns = module._conv_forward(layer_input, identity, None)  # (N, groups * fan, *positions)
        n = columns.shape[0]
        return columns.reshape(n, groups, fan, -1).permute(1, 0, 3, 2).reshape(groups, -1, fan)

    def channel_view(self, output: Tensor) -> Tensor:
        """A contiguous output viewed as ``(outer, channels, inner)``, the output channels in the middle."""
        if self.channels_last_in_output:
            return output.view(-1, output.shape[-1], 1)
        return output.view(output.shape[0], output.shape[1], -1)


_CONV = AffineAdapter(transposed=False, channels_last_in_output=False)
_CONV_TRANSPOSE = AffineAdapter(transposed=True, channels_last_in_output=False)
_LINEAR = AffineAdapter(transposed=False, channels_last_in_output=True)

ADAPTERS: dict[type[nn.Module], AffineAdapter] = {
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Conv3d: _CONV,
    nn.ConvTranspose1d: _CONV_TRANSPOSE,
    nn.ConvTranspose2d: _CONV_TRANSPOSE,
    nn.ConvTranspose3d: _CONV_TRANSPOSE,
    nn.Linear: _LINEAR,
}


def _registered(module: nn.Module) -> AffineAdapter | None:
    for cls in type(module).__mro__:
        if cls in ADAPTERS:
            return ADAPTERS[cls]
    return None


def is_affine(module: nn.Module) -> bool:
    """Whether ``module`` belongs to a family in ``ADAPTERS`` (subclasses included)."""
    return _registered(module) is not None


def adapter_for(module: nn.Module) -> AffineAdapter:
    """The adapter of ``module``'s family (subclasses included)."""
    adapter = _registered(module)
    if adapter is None:
        known = ", ".join(cls.__name__ for cls in ADAPTERS)
        raise MagicInitError(f"{type(module).__name__} is not an affine layer magicinit knows ({known})")
    return adapter


def find_affine_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All affine layers of ``model`` by qualified name, in registration order."""
    return {name: module for name, module in model.named_modules() if is_affine(module)}
