"""Part 1 of the method: within-layer initialization (per-channel normalization).

One forward pass over the init data does it all. A pre-hook on every affine
layer draws its filters (``samplers``) and zeroes its bias just before the
layer runs; a forward hook measures the mean ``mu_i`` and standard deviation
``sigma_i`` of every output channel, sets ``W_i <- W_i / sigma_i`` and
``b_i <- beta - mu_i / sigma_i``, and hands the *normalized* output on, so every
later layer already sees the initialized layers before it. The cost is one
forward pass plus a few element-wise passes over each layer's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import adapter_for
from .context import PassContext
from .errors import MagicInitError
from .safety import temporary_hooks
from .samplers import Sampler, SamplerRequest
from .stats import ChannelMoments

# A channel is treated as constant (zero variance) when its std is below this
# many units of rounding of the output's dtype, where one unit is the rounding
# a dot product of the channel's filter with the layer's input can make.
ZERO_VARIANCE_TOLERANCE = 4.0


@dataclass
class WithinLayerResult:
    """What Part 1 measured and did at one layer.

    Attributes:
        before: channel moments of the drawn filters' output (bias zero), measured.
        after: channel moments of the output handed on, which follow exactly from
            ``before`` through the per-channel affine map applied (mean ``beta``,
            std 1 up to rounding); a fresh forward pass re-measures them.
        scale: the factor applied to every output channel's filter.
        zero_variance: channels that were constant on the init data; they got
            the layer's median scale (or unit-norm filters) and mean ``beta``.
        mean_set: False for a layer without bias, whose channel means stay as they are.
        notes: what the sampler did differently (e.g. a fallback to gaussian).
    """

    before: ChannelMoments
    after: ChannelMoments
    scale: Tensor
    zero_variance: list[int] = field(default_factory=list)
    mean_set: bool = True
    notes: list[str] = field(default_factory=list)


def _for_statistics(output: Tensor) -> Tensor:
    """``output`` in float32 or better and contiguous: itself where it already is, else a copy."""
    dtype = output.dtype if output.dtype in (torch.float32, torch.float64) else torch.float32
    return output.to(dtype=dtype, memory_format=torch.contiguous_format)


def _zero_variance(moments: ChannelMoments, filters: Tensor, input_rms: float, dtype: torch.dtype) -> Tensor:
    """Channels whose std on the init data is no more than rounding noise."""
    filter_norms = filters.norm(dim=-1).flatten().to(moments.mean)
    magnitude = moments.mean.abs() + filter_norms * input_rms * math.sqrt(filters.shape[-1])
    return moments.std <= ZERO_VARIANCE_TOLERANCE * torch.finfo(dtype).eps * magnitude


def _input_rms(args: tuple[Any, ...]) -> float:
    """Root mean square of the layer input's first samples (a cheap scale reference)."""
    if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
        return 0.0
    head = args[0][:2].float()
    return float(head.square().mean().sqrt()) if head.numel() else 0.0


class _WithinPass:
    """Hooks of one Part 1 pass; state lives here, not in globals."""

    def __init__(
        self,
        context: PassContext,
        sampler: Sampler,
        beta: float,
        patch_budget_bytes: int,
        on_layer_done: Callable[[int], None],
    ) -> None:
        self.context = context
        self.sampler = sampler
        self.beta = beta
        self.patch_budget_bytes = patch_budget_bytes
        self.on_layer_done = on_layer_done
        self.sampler_notes: dict[str, list[str]] = {}
        self.results: dict[str, WithinLayerResult] = {}
        self.input_rms: dict[str, float] = {}

    def draw(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if name in self.input_rms:  # a later call of a shared layer: already drawn
            return
        rms = _input_rms(args)
        self.input_rms[name] = rms if self.context.collective is None else self.context.collective.max(rms)
        adapter = adapter_for(module)
        current = adapter.to_filters(module).detach().float().cpu()
        request = SamplerRequest(
            name=name, module=module, shape=current.shape, current=current, layer_input=args,
            generator=self.context.generator, patch_budget_bytes=self.patch_budget_bytes,
            progress=self.context.progress, collective=self.context.collective,
        )
        filters = self.sampler(request)
        self.sampler_notes[name] = request.notes
        if filters.shape != current.shape:
            raise MagicInitError(
                f"layer '{name}': the sampler returned filters of shape {tuple(filters.shape)}, "
                f"expected {tuple(current.shape)}"
            )
        weight = module.weight
        weight.copy_(adapter.from_filters(module, filters.to(device=weight.device, dtype=weight.dtype)))
        if module.bias is not None:
            module.bias.zero_()

    def normalize(self, name: str, module: nn.Module, output: Any) -> Tensor | None:
        if name in self.results:
            return None  # a later call of a shared layer: already initialized
        if not isinstance(output, Tensor) or not output.is_floating_point():
            raise MagicInitError(
                f"layer '{name}' returned {type(output).__name__}, not a floating tensor; "
                "exclude it with skip=[...]"
            )
        adapter = adapter_for(module)
        work = _for_statistics(output)
        view = adapter.channel_view(work)
        before = ChannelMoments.of(view, in_place=True)
        if self.context.collective is not None:  # the moments of all ranks' data; the view re-centred on their mean
            local_mean = before.mean
            before = self.context.collective.merge_moments(before)
            view.add_((local_mean - before.mean).view(1, -1, 1).to(view.dtype))
        if not (bool(torch.isfinite(before.mean).all()) and bool(torch.isfinite(before.sum_sq_dev).all())):
            raise MagicInitError(
                f"layer '{name}': its output on the init data is not finite (overflow in "
                f"{output.dtype}?); run the initialization in float32 and cast afterwards"
            )
        std = before.std
        filters = adapter.to_filters(module).to(work.dtype)
        dead = _zero_variance(before, filters, self.input_rms[name], output.dtype)
        scale = 1.0 / torch.where(dead, torch.ones_like(std), std)
        if bool(dead.any()):
            if bool((~dead).any()):
                fallback = scale[~dead].median().expand_as(scale)
            else:
                norms = filters.norm(dim=-1).flatten().to(scale)
                fallback = 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms))
            scale = torch.where(dead, fallback, scale)
        mean_set = module.bias is not None
        mean_after = torch.full_like(scale, self.beta) if mean_set else before.mean * scale
        groups, per_group = filters.shape[:2]
        new_filters = filters * scale.view(groups, per_group, 1).to(filters)
        module.weight.copy_(adapter.from_filters(module, new_filters.to(module.weight.dtype)))
        if mean_set:
            module.bias.copy_((self.beta - before.mean * scale).to(module.bias.dtype))
        # the output handed on: (z - mu) * scale + mean_after, what the new W and b compute;
        # a constant channel passes on its exact constant, not its rounding noise
        pass_on_scale = torch.where(dead, torch.zeros_like(scale), scale)
        view.mul_(pass_on_scale.view(1, -1, 1).to(work.dtype)).add_(mean_after.view(1, -1, 1).to(work.dtype))
        if work is not output:
            output.copy_(work)
        after = ChannelMoments(before.count, mean_after, before.sum_sq_dev * pass_on_scale.square())
        self.results[name] = WithinLayerResult(
            before=before,
            after=after,
            scale=scale.cpu(),
            zero_variance=dead.nonzero().flatten().tolist(),
            mean_set=mean_set,
            notes=self.sampler_notes.get(name, []),
        )
        self.on_layer_done(1)
        return output


def normalize_within(
    context: PassContext,
    layers: dict[str, nn.Module],
    sampler: Sampler,
    *,
    beta: float,
    patch_budget_bytes: int,
) -> dict[str, WithinLayerResult]:
    """Run Part 1 on ``layers`` in one forward pass of the init data; returns per-layer results.

    Layers that the forward pass never calls are left untouched and are
    absent from the result. With several processes, every channel's moments
    are those of all ranks' data. The caller restores the model on error.
    """
    with context.progress_bar(len(layers), "magicinit: within-layer", unit="layer") as advance:
        within = _WithinPass(context, sampler, beta, patch_budget_bytes, advance)
        with temporary_hooks() as hooks, torch.no_grad():
            for name, module in layers.items():
                hooks.before(module, lambda m, args, name=name: within.draw(name, m, args))
                hooks.after(module, lambda m, args, out, name=name: within.normalize(name, m, out))
            context.run()
    return within.results


def channel_moments_of_layers(context: PassContext, layers: dict[str, nn.Module]) -> dict[str, ChannelMoments]:
    """Channel moments of every layer's output (first call) in one no-grad pass over the init
    data (over all ranks' data with several processes); nothing changes."""
    moments: dict[str, ChannelMoments] = {}
    collective = context.collective

    def record(name: str, module: nn.Module, output: Any) -> None:
        if name not in moments and isinstance(output, Tensor) and output.is_floating_point():
            local = ChannelMoments.of(adapter_for(module).channel_view(_for_statistics(output)))
            moments[name] = local if collective is None else collective.merge_moments(local)

    with temporary_hooks() as hooks, torch.no_grad():
        for name, module in layers.items():
            hooks.after(module, lambda m, args, out, name=name: record(name, m, out))
        context.run()
    return moments
