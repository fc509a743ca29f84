"""Part 1 of the method: within-layer initialization (per-channel normalization).

One forward pass over the init data does it all, under a ``TorchFunctionMode``
that sees every affine site (``sites``). At the first use of each weight (of
each disjoint part of it, for the slices of a packed projection) it
draws the filters (``samplers``), makes the call with them and a zero bias,
measures the mean ``mu_i`` and standard deviation ``sigma_i`` of every output
channel, sets ``W_i <- W_i / sigma_i`` and ``b_i <- beta - mu_i / sigma_i`` (through
the weight's real parameters), and makes the call again with them: that output,
what the model now computes there, rounding included, is handed on, so every
later site is normalized on the input the initialized layers before it really
give. (Handing on the ideal ``(z - mu_i) / sigma_i + beta`` instead lets each
layer's rounding grow through the large scales of later layers whose channels
have a small spread: with few values per channel, behind a global pool or in a
squeeze-excitation block, channels drifted far from std 1. Which later layer
amplifies cannot be told when a site is normalized, so every site makes the
second call.) The cost is one forward pass plus a second call and a few
element-wise passes per site; where a later write can change an earlier
layer's output (a shared bias; ``after_may_differ``), one more pass
(``remeasure_after``) measures every layer's output with the final weights,
for the report.

A weight used at several sites is normalized at its first use in data order;
its later uses see it as it then is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .adapters import Layout
from .context import PassContext
from .distributed import Collective
from .errors import MagicInitError
from .samplers import Sampler, SamplerRequest
from .sites import CallInterceptor, FirstUses, SiteCall, UnitIndex, WeightUnit
from .stats import ChannelMoments

# A channel is treated as constant (zero variance) when its std is below this
# many units of rounding of the output's dtype, where one unit is the rounding
# a dot product of the channel's filter with the layer's input can make.
ZERO_VARIANCE_TOLERANCE = 4.0
EXTREME_MAGNITUDE = 1e18  # float32 outputs beyond it (or below its inverse) get float64 statistics


@dataclass(frozen=True)
class TargetBand:
    """How far a channel re-measured after Part 1 may be from Part 1's target (std 1, mean ``beta``)
    before the report says that the layer is off target."""

    std_low: float
    std_high: float
    mean: float  # largest |mean - beta| (layers whose bias Part 1 set)


# Part 1 hits its target up to rounding, far inside this band in any dtype (bfloat16 rounds at 2**-8):
# a channel outside it was moved by more than rounding (a bias shared with a later layer, a forward
# that is not repeatable), and the report says so.
ON_TARGET = TargetBand(std_low=0.5, std_high=2.0, mean=0.5)
# Below this many values per channel (samples times positions), a channel's moments are a few numbers'
# spread: exact on the init data, but too few to stand for the data a training run will see (the relative
# standard error of a std from n values is about 1 / sqrt(2 n): 25 % at 8). A head or squeeze-excitation
# layer sees one value per sample, so 8 samples, the fewest the README's benchmarks use, pass.
FEW_VALUES_PER_CHANNEL = 8


@dataclass
class WithinLayerResult:
    """What Part 1 measured and did at one layer.

    Attributes:
        before: channel moments of the drawn filters' output (bias zero), measured.
        after: channel moments of the layer's output with its new weight and bias, measured
            where Part 1 normalized it (mean ``beta`` and std 1 up to rounding), and measured
            again with the final weights of all layers by ``remeasure_after`` where they may differ.
        scale: the factor applied to every output channel's filter.
        zero_variance: channels that were constant on the init data; they got
            the layer's median scale (or unit-norm filters) and mean ``beta``.
        mean_set: False for a layer without (writable) bias, whose channel means stay as they are.
        notes: what the sampler did differently (e.g. a fallback to gaussian).
        sites: how many sites normalized a part of the weight (more than one for disjoint
            slices of one parameter; their channels follow each other in site order).
        bias: qualified name of the bias parameter Part 1 set (None where it set none).
    """

    before: ChannelMoments
    after: ChannelMoments
    scale: Tensor
    zero_variance: list[int] = field(default_factory=list)
    mean_set: bool = True
    notes: list[str] = field(default_factory=list)
    sites: int = 1
    bias: str | None = None

    @property
    def constant(self) -> bool:
        """Every output channel was constant on the init data: there was nothing to normalize."""
        return len(self.zero_variance) == self.scale.numel()

    @property
    def values_per_channel(self) -> int:
        """The fewest values a channel's moments were taken over (samples times positions)."""
        count = self.after.count
        return int(count.min()) if isinstance(count, Tensor) else int(count)

    def off_target(self, beta: float) -> str | None:
        """What is off target in ``after`` (``ON_TARGET``), with the worst channels; None if nothing.

        Constant channels have no std to set, and a layer whose bias Part 1 did not set no mean."""
        std, mean = self.after.std.double(), self.after.mean.double()
        live = torch.ones_like(std, dtype=torch.bool)
        live[self.zero_variance] = False
        std_off = live & ((std < ON_TARGET.std_low) | (std > ON_TARGET.std_high) | ~torch.isfinite(std))
        mean_distance = (mean - beta).abs() if self.mean_set else torch.zeros_like(mean)
        mean_off = ~(mean_distance <= ON_TARGET.mean)
        off = std_off | mean_off
        if not bool(off.any()):
            return None
        parts = []
        if bool(std_off.any()):
            distance = torch.where(std_off, std.clamp_min(1e-300).log().abs().nan_to_num(math.inf), -1.0)
            worst = int(distance.argmax())
            parts.append(f"std {float(std[worst]):.3g} (channel {worst})")
        if bool(mean_off.any()):
            worst = int(torch.where(mean_off, mean_distance.nan_to_num(math.inf), -1.0).argmax())
            parts.append(f"mean {float(mean[worst]):.3g} (channel {worst}, beta {beta:g})")
        return (
            f"off target after Part 1: re-measured with the final weights, {int(off.sum())} of {off.numel()} "
            f"channel(s) have a std outside [{ON_TARGET.std_low:g}, {ON_TARGET.std_high:g}] or a mean more than "
            f"{ON_TARGET.mean:g} from beta; worst: {', '.join(parts)}"
        )

    def followed_by(self, other: WithinLayerResult) -> WithinLayerResult:
        """This result and ``other`` (a later, disjoint part of the same weight), channels side by side."""
        return WithinLayerResult(
            before=ChannelMoments.concat([self.before, other.before]),
            after=ChannelMoments.concat([self.after, other.after]),
            scale=torch.cat([self.scale, other.scale]),
            zero_variance=self.zero_variance + [self.scale.numel() + i for i in other.zero_variance],
            mean_set=self.mean_set and other.mean_set,
            notes=self.notes + [n for n in other.notes if n not in self.notes],
            sites=self.sites + other.sites,
            bias=self.bias or other.bias,
        )


def _for_statistics(output: Tensor) -> Tensor:
    """``output`` in float32 or better and contiguous: itself where it already is, else a copy. Outputs
    whose magnitude is beyond ``EXTREME_MAGNITUDE`` (or below its inverse) get float64, where their
    squares neither overflow nor underflow."""
    dtype = output.dtype if output.dtype in (torch.float32, torch.float64) else torch.float32
    if dtype != torch.float64 and output.numel():
        smallest, biggest = torch.aminmax(output.detach())
        largest = max(-float(smallest), float(biggest))
        if math.isfinite(largest) and not 1 / EXTREME_MAGNITUDE <= largest <= EXTREME_MAGNITUDE and largest > 0:
            dtype = torch.float64
    return output.to(dtype=dtype, memory_format=torch.contiguous_format)


def _zero_variance(moments: ChannelMoments, filters: Tensor, input_rms: float, dtype: torch.dtype) -> Tensor:
    """Channels whose std on the init data is no more than rounding noise.

    One unit of noise is what rounding makes of a channel's values: the output's own rounding
    (its dtype's resolution times the channel's typical magnitude, ``|mean| + ||filter|| * input rms``)
    plus the accumulation's over the fan-in (float32's resolution, or float64's for float64 layers,
    times ``sqrt(fan_in)`` times that magnitude: a random walk of the products' roundings).
    """
    filter_norms = filters.norm(dim=-1).flatten().to(moments.mean)
    typical = filter_norms * input_rms
    accumulation = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    noise = (
        torch.finfo(dtype).eps * (moments.mean.abs() + typical) + accumulation * math.sqrt(filters.shape[-1]) * typical
    )
    return moments.std <= ZERO_VARIANCE_TOLERANCE * noise


def _per_channel(values: Tensor, site: SiteCall, output: Tensor) -> Tensor:
    """One value per output channel of ``site``, shaped to broadcast against its ``output``, in its dtype."""
    values = values.to(device=output.device, dtype=output.dtype if values.is_floating_point() else values.dtype)
    if site.adapter.channels_last_in_output:
        return values
    return values.view(1, -1, *([1] * (output.dim() - 2)))


def _input_rms(layer_input: Any) -> float:
    """Root mean square of the layer input's first samples (a cheap scale reference, in float64: init
    data of magnitude 1e-30 or 1e30 neither underflows nor overflows)."""
    if not isinstance(layer_input, Tensor) or not layer_input.is_floating_point():
        return 0.0
    head = layer_input[:2].double()
    return float(head.square().mean().sqrt()) if head.numel() else 0.0


class _WithinPass(CallInterceptor):
    """The mode of one Part 1 pass; state lives here, not in globals."""

    def __init__(
        self,
        context: PassContext,
        index: UnitIndex,
        units: dict[str, WeightUnit],
        sampler: Sampler,
        *,
        beta: float,
        patch_budget_bytes: int,
        on_layer_done: Callable[[int], None],
    ) -> None:
        super().__init__(index)
        self.context = context
        self.to_initialize = units
        self.sampler = sampler
        self.beta = beta
        self.patch_budget_bytes = patch_budget_bytes
        self.on_layer_done = on_layer_done
        self.results: dict[str, WithinLayerResult] = {}
        self.first_uses = FirstUses()

    def on_call(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], site: SiteCall | None
    ) -> Any:
        if site is None or site.unit.name not in self.to_initialize or not self.first_uses.claim(site):
            return func(*args, **kwargs)  # not a site, a weight left alone, or a later use of a weight
        try:
            return self._initialize(site)
        except MagicInitError:
            raise
        except Exception as error:  # the sampler's, or magicinit's: not the data's
            raise MagicInitError(
                f"layer '{site.unit.name}': Part 1 failed at its site ({type(error).__name__}: {error})"
            ) from error

    def _draw(self, site: SiteCall) -> tuple[Tensor, list[str]]:
        """New filters for the site's weight, as a weight tensor, and the sampler's notes."""
        unit, collective = site.unit, self.context.collective
        adapter, weight, groups = site.adapter, site.weight, site.groups
        current = adapter.to_filters(weight, groups).detach().float().cpu()
        request = SamplerRequest(
            name=unit.name,
            module=self.context.model.get_submodule(unit.owner),
            shape=current.shape,
            current=current,
            layer_input=(site.input,),
            generator=self.context.generator,
            patch_budget_bytes=self.patch_budget_bytes,
            progress=self.context.progress,
            collective=collective,
            input_patches=site.patches,
        )
        filters = self.sampler(request)
        if not isinstance(filters, Tensor) or filters.shape != current.shape:
            got = tuple(filters.shape) if isinstance(filters, Tensor) else type(filters).__name__
            raise MagicInitError(
                f"layer '{unit.name}': the sampler returned filters of shape {got}, expected {tuple(current.shape)}"
            )
        drawn = adapter.from_filters(filters.to(device=weight.device, dtype=weight.dtype), weight.shape, groups)
        if unit.kind == "prune":  # pruned entries stay zero
            drawn = drawn * getattr(self.context.model.get_submodule(unit.owner), f"{unit.attribute}_mask")
        return drawn, request.notes

    def _initialize(self, site: SiteCall) -> Tensor:
        unit, collective = site.unit, self.context.collective
        name = unit.name
        rms = _input_rms(site.input)
        input_rms = rms if collective is None else collective.max(rms)
        drawn, notes = self._draw(site)
        bias = site.bias
        mean_set = bias is not None and self.index.writable(bias) is not None
        if bias is None:
            notes = [*notes, "no bias: channel means are not set to beta (std is)"]
        elif not mean_set:
            notes = [
                *notes,
                "its bias is no parameter, or is frozen or skipped: channel means are not set to beta (std is)",
            ]
        output = site.call(weight=drawn, bias=None)  # measured without the bias; a bias kept is added back below
        if not isinstance(output, Tensor) or not output.is_floating_point():
            raise MagicInitError(
                f"layer '{name}' returned {type(output).__name__}, not a floating tensor; exclude it with skip=[...]"
            )
        adapter, groups = site.adapter, site.groups
        work = _for_statistics(output)
        view = adapter.channel_view(work)
        before = ChannelMoments.of(view, in_place=True)
        if collective is not None:  # the moments of all ranks' data; the view re-centred on their mean
            local_mean = before.mean
            before = collective.merge_moments(before)
            view.add_((local_mean - before.mean).view(1, -1, 1).to(view.dtype))
        if not (bool(torch.isfinite(before.mean).all()) and bool(torch.isfinite(before.sum_sq_dev).all())):
            remedy = (
                "run the initialization in float32 and cast afterwards"
                if torch.finfo(output.dtype).bits < 32
                else "check the layer's input (an earlier operation of the forward may overflow) and its weights"
            )
            # looked at only here: a check of every drawn weight costs more than a forward on a large layer
            if not bool(torch.isfinite(drawn).all()):
                raise MagicInitError(
                    f"layer '{name}': the sampler returned filters with NaN or Inf values; a sampler must return "
                    "finite filters (docs/guide.md, 'A data-driven sampler of your own')"
                )
            largest = float(drawn.detach().abs().max()) if drawn.numel() else 0.0
            raise MagicInitError(
                f"layer '{name}': its output on the init data is not finite (overflow in {output.dtype}?) with the "
                f"filters the sampler drew (largest magnitude {largest:.3g}); {remedy}"
            )
        std = before.std
        filters = adapter.to_filters(drawn, groups).to(work.dtype)
        dead = _zero_variance(before, filters, input_rms, output.dtype)
        scale = 1.0 / torch.where(dead, torch.ones_like(std), std)
        if bool(dead.any()):
            if bool((~dead).any()):
                fallback = scale[~dead].median().expand_as(scale)
            else:
                norms = filters.norm(dim=-1).flatten().to(scale)
                fallback = 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms))
            scale = torch.where(dead, fallback, scale)
        mean_after = torch.full_like(scale, self.beta) if mean_set else before.mean * scale
        new_filters = filters * scale.view(groups, -1, 1).to(filters)
        weight = site.weight
        new_weight = adapter.from_filters(new_filters.to(weight.dtype), weight.shape, groups)
        unit.write_(self.context.model, weight, new_weight)
        if mean_set:
            assert bias is not None  # mean_set says so
            bias.copy_((self.beta - before.mean * scale).to(bias.dtype))
        del output, work, view  # the drawn filters' output is measured: free it before the second call
        handed_on = site.call(weight=new_weight)  # the new weight, and the bias as the call reads it (a kept one too)
        if bool(dead.any()):  # a constant channel passes on its exact constant, not its rounding noise
            handed_on = torch.where(
                _per_channel(dead, site, handed_on), _per_channel(mean_after, site, handed_on), handed_on
            )
        after = ChannelMoments.of(adapter.channel_view(_for_statistics(handed_on)))
        if collective is not None:
            after = collective.merge_moments(after)
        result = WithinLayerResult(
            before=before,
            after=after,
            scale=scale.cpu(),
            zero_variance=dead.nonzero().flatten().tolist(),
            mean_set=mean_set,
            notes=notes,
            bias=self.index.writable(bias) if mean_set else None,
        )
        self.results[name] = self.results[name].followed_by(result) if name in self.results else result
        if result.sites == self.results[name].sites:
            self.on_layer_done(1)
        return handed_on


def normalize_within(
    context: PassContext,
    index: UnitIndex,
    units: dict[str, WeightUnit],
    sampler: Sampler,
    *,
    beta: float,
    patch_budget_bytes: int,
) -> dict[str, WithinLayerResult]:
    """Run Part 1 on the weights ``units`` in one forward pass of the init data; returns per-weight results.

    Weights that the forward pass never uses are left untouched and are
    absent from the result. With several processes, every channel's moments
    are those of all ranks' data. The caller restores the model on error.
    """
    with context.progress_bar(len(units), "magicinit: within-layer", unit="layer") as advance:
        within = _WithinPass(
            context, index, units, sampler, beta=beta, patch_budget_bytes=patch_budget_bytes, on_layer_done=advance
        )
        with torch.no_grad(), within:
            context.run()
    return within.results


class _FirstSiteMoments(CallInterceptor):
    """Records the channel moments of the first site of every weight in ``units``."""

    def __init__(self, index: UnitIndex, units: dict[str, WeightUnit], collective: Collective | None) -> None:
        super().__init__(index)
        self.watched, self.collective = units, collective
        self.moments: dict[str, ChannelMoments] = {}
        self.first_uses = FirstUses()
        self.layouts: dict[str, Layout] = {}

    def on_call(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], site: SiteCall | None
    ) -> Any:
        output = func(*args, **kwargs)
        if site is None or site.unit.name not in self.watched or not isinstance(output, Tensor):
            return output
        if output.is_floating_point() and self.first_uses.claim(site):
            local = ChannelMoments.of(site.adapter.channel_view(_for_statistics(output)))
            moments = local if self.collective is None else self.collective.merge_moments(local)
            name = site.unit.name
            if name in self.moments:
                moments = ChannelMoments.concat([self.moments[name], moments])
            self.moments[name] = moments
            self.layouts.setdefault(name, site.layout)
        return output


def first_site_moments(
    context: PassContext, index: UnitIndex, units: dict[str, WeightUnit]
) -> tuple[dict[str, ChannelMoments], dict[str, Layout]]:
    """Channel moments of the first site of every weight in ``units``, in one no-grad pass over the
    init data (over all ranks' data with several processes), and each weight's filter layout;
    nothing changes."""
    recorder = _FirstSiteMoments(index, units, context.collective)
    with torch.no_grad(), recorder:
        context.run()
    return recorder.moments, recorder.layouts


def after_may_differ(results: dict[str, WithinLayerResult]) -> bool:
    """Whether a layer's output with the final Part 1 weights may differ from what Part 1 measured right after
    normalizing it (``remeasure_after`` then measures it): where a bias is shared by two layers (the later one
    writes it after the earlier was measured), where a layer has a constant channel (Part 1 hands on its exact
    constant, the model computes it with rounding), or where a weight is normalized at several sites.
    Otherwise every layer's output in the Part 1 pass is the model's own call with its final weights on the
    model's own input (each site's second call), and what it measured there is what the model gives."""
    biases = [result.bias for result in results.values() if result.bias is not None]
    return (
        len(biases) != len(set(biases))
        or any(result.zero_variance for result in results.values())
        or any(result.sites > 1 for result in results.values())
    )


def remeasure_after(
    context: PassContext, index: UnitIndex, units: dict[str, WeightUnit], results: dict[str, WithinLayerResult]
) -> None:
    """Set every result's ``after`` to the channel moments its layer gives with the final Part 1 weights
    of all layers, at the sites Part 1 normalized (``first_site_moments``: one more pass over the init data).

    They differ from those measured during Part 1 where something changed after the layer's own
    normalization: a bias shared with a later layer (and then the layers after it too), a forward
    that is not repeatable.
    """
    moments, _ = first_site_moments(context, index, {name: units[name] for name in results})
    for name, result in results.items():
        measured = moments.get(name)
        if measured is not None and measured.mean.shape == result.after.mean.shape:
            result.after = measured
