"""The strategy from site activations (``FromActivations``): every draw's norms from the inputs and output
gradients of the affine sites, at the cost of about two backward passes a round.

One batched forward over the data is kept for every round, and per round one backward of all the draws'
noise at once (a draw is one sample). At every affine site the input ``x`` and the output gradient ``g`` of
each sample give its norms directly: for a linear map on one vector per sample ``||dL/dW_i||^2 = g_i^2
||x||^2``; with several positions (a sequence, a convolution) ``g_i K g_i^T`` from the Gram matrix ``K`` of
the sample's positions where they are few against the channels (``norms.gram_norms``), else the sample's
gradient ``g^T x`` is formed, for a block of samples at a time (a convolution's by one weight-gradient call
with the samples as extra groups). It needs every weight to be a plain parameter used only as the weight of
linear maps, matrix products and convolutions, or (tied to a linear map's weight, as a language model's
output layer is to its input embedding) as the table of an embedding lookup, whose per-sample gradient adds
each position's output gradient to the row it read (checked at every call of the recorded forward: else
``StrategyRefused``), and the samples not to interact (checked by ``choose.choose_strategy`` on the first
and the last sample, against the same norms of each sample run alone). That the per-site formulas equal the
per-sample gradients is the tests' job (``tests/test_rate_strategies.py``).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.grad
from torch import Tensor

from ..adapters import CONV, LINEAR, MATMUL
from ..inputs import Batch, all_tensors, batch_size, select_batch
from ..operations import call_argument
from ..sites import CallInterceptor, SiteCall, UnitIndex
from ..torch_internals import view_base
from .norms import (
    BLOCK_FLOATS,
    DrawNorms,
    gram_floats,
    gram_is_cheaper,
    gram_norms,
    sample_blocks,
    squared_norms,
    sum_over_slices,
)
from .strategy import NoiseDraws, StrategyRefused, output_tensors


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


_WEIGHT_GRADIENTS = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def _conv_geometry(site: SiteCall, x: Tensor) -> tuple[Tensor, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """A convolution call's input (padded here where it asked for ``padding="same"``), stride, padding and
    dilation, each a tuple over its spatial dimensions."""
    weight = site.weight
    dims = weight.dim() - 2
    stride, dilation = (
        _tuple(call_argument(site.args, site.kwargs, slot, 1), dims) for slot in ((3, "stride"), (5, "dilation"))
    )
    padding = call_argument(site.args, site.kwargs, (4, "padding"), 0)
    if isinstance(padding, str):
        if padding == "same":  # torch's own split: the extra element on the right
            totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            x = F.pad(x, [p for total in reversed(totals) for p in (total // 2, total - total // 2)])
        padding = 0
    return x, stride, _tuple(padding, dims), dilation


def _conv_sample_gradients(site: SiteCall, x: Tensor, grad: Tensor) -> Tensor:
    """Every sample's own weight gradient of a convolution, as filters ``(n, groups, out/groups, fan_in)``:
    one weight-gradient call with the samples as extra groups (sample b's channels meet only its own
    output gradient), as fast as the batch's summed gradient."""
    weight, groups = site.weight, site.groups
    n = x.shape[0]
    x, stride, padding, dilation = _conv_geometry(site, x)
    out, fan_in_channels = weight.shape[0], weight.shape[1]
    pointwise = all(k == 1 for k in weight.shape[2:]) and set(stride) == {1} and set(padding) == {0}
    if pointwise:  # a 1x1 convolution is a linear map at every position: one batched matrix product
        rows_in = x.reshape(n, groups, fan_in_channels, -1)
        rows_out = grad.reshape(n, groups, out // groups, -1)
        return torch.einsum("ngop,ngip->ngoi", rows_out, rows_in)
    per_sample = _WEIGHT_GRADIENTS[weight.dim() - 2](
        x.reshape(1, n * x.shape[1], *x.shape[2:]),
        (n * out, fan_in_channels, *weight.shape[2:]),
        grad.reshape(1, n * out, *grad.shape[2:]),
        stride,
        padding,
        dilation,
        n * groups,
    )
    return per_sample.reshape(n, groups, out // groups, -1)


def _conv_patch_columns(site: SiteCall, x: Tensor) -> Tensor:
    """The input patch every output position of a 1- or 2-d convolution reads, ``(n, groups, fan_in,
    positions)``, with ``fan_in`` ordered as the weight's (input channel, then kernel position)."""
    weight, groups = site.weight, site.groups
    x, stride, padding, dilation = _conv_geometry(site, x)
    kernel = tuple(weight.shape[2:])
    if weight.dim() == 3:  # a 1-d convolution as a 2-d one of height 1
        x, kernel, stride, padding, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    columns = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return columns.reshape(x.shape[0], groups, -1, columns.shape[-1])


@dataclass
class _SiteRecord:
    """One affine call of a measured weight in the batched forward: its input and how to read its gradient."""

    name: str
    site: SiteCall
    input: Tensor


@dataclass
class _LookupRecord:
    """One embedding lookup in a measured weight in the batched forward: the indices it read (one row per
    sample first) and the row whose gradient it leaves at zero (``padding_idx``; None: none)."""

    name: str
    indices: Tensor
    padding_idx: int | None


def _embedding_lookup(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Tensor, Tensor, int | None] | None:
    """The table, the indices and the padding row of an embedding lookup (``F.embedding`` or
    ``torch.embedding``); None where ``func`` is neither. ``StrategyRefused`` where the lookup renormalizes
    the table (``max_norm``) or scales its gradient by the indices' frequencies in the batch
    (``scale_grad_by_freq``: a sample's gradient then depends on the other samples)."""
    if func is F.embedding:
        indices, table = call_argument(args, kwargs, (0, "input")), call_argument(args, kwargs, (1, "weight"))
        padding = call_argument(args, kwargs, (2, "padding_idx"), None)
        max_norm = call_argument(args, kwargs, (3, "max_norm"), None)
        by_frequency = call_argument(args, kwargs, (5, "scale_grad_by_freq"), False)
    elif func is torch.embedding:
        table, indices = call_argument(args, kwargs, (0, "weight")), call_argument(args, kwargs, (1, "indices"))
        padding = call_argument(args, kwargs, (2, "padding_idx"), -1)
        padding = None if padding == -1 else padding  # torch.embedding's "none"
        max_norm, by_frequency = None, call_argument(args, kwargs, (3, "scale_grad_by_freq"), False)
    else:
        return None
    if not isinstance(table, Tensor) or not isinstance(indices, Tensor):
        return None
    if max_norm is not None or by_frequency:
        option = "max_norm" if max_norm is not None else "scale_grad_by_freq"
        raise StrategyRefused(f"an embedding lookup with {option}")
    if padding is not None and padding < 0:
        padding += table.shape[0]
    return table, indices, padding


def _call_weakly(
    method: weakref.WeakMethod[Callable[[_SiteRecord | _LookupRecord, Tensor], None]],
    record: _SiteRecord | _LookupRecord,
    grad: Tensor,
) -> None:
    """A gradient hook's body: ``method(record, grad)`` while its object lives. The hooks sit in the kept
    graph, which the object holds: a strong reference back would make a cycle that keeps the graph alive
    after an error, until a garbage collection."""
    target = method()
    if target is not None:
        target(record, grad)


class _SiteCapture(CallInterceptor):
    """Records the affine calls of the measured weights, and hooks their outputs' gradients."""

    def __init__(
        self,
        index: UnitIndex,
        names: dict[int, str],
        on_gradient: Callable[[_SiteRecord | _LookupRecord, Tensor], None],
    ):
        super().__init__(index)
        self.names, self.on_gradient = names, weakref.WeakMethod(on_gradient)
        self.records: list[_SiteRecord | _LookupRecord] = []
        self.zeros: dict[tuple[torch.dtype, torch.device], Tensor] = {}  # the leaves the backward is asked for

    def _measured_name(self, tensor: Tensor) -> str | None:
        """The name of the measured weight ``tensor`` is, or is a view of (None: neither)."""
        base = view_base(tensor)
        return self.names.get(id(tensor if base is None else base))

    def _refuse_other_uses(
        self, func: Callable[..., Any], arguments: object, output: object, skip: Tensor | None
    ) -> None:
        """Refuse a measured weight that reaches the outputs other than as the weight of an affine call
        (``skip``): a gradient through such a use (``w * 2``, ``x @ w.t()``, a custom ``autograd.Function``,
        which computes under no_grad) is invisible to the site norms. Calls that give no tensor (``w.shape``,
        ``w.dtype``) or give the weight itself back (``w.contiguous()``, ``w.to(its dtype)``) are no use."""
        for tensor in all_tensors(arguments):
            if tensor is skip:
                continue
            name = self._measured_name(tensor)
            if name is None:
                continue
            results = list(all_tensors(output))
            if all(result is tensor for result in results):
                continue
            carried = any(result.requires_grad for result in results)
            if carried or not torch.is_grad_enabled():
                where = "" if carried else " where autograd does not record it (no_grad, or a custom Function)"
                raise StrategyRefused(
                    f"'{name}' is used by {getattr(func, '__name__', func)}{where}, "
                    "not only as the weight of affine maps"
                )

    def on_call(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], site: SiteCall | None
    ) -> Any:
        """Run the call; record it where it is an affine call of a measured weight (its output then carries
        the gradient hook), and refuse any other use of a measured weight."""
        output = func(*args, **kwargs)
        carried = isinstance(output, Tensor) and output.requires_grad and output.is_floating_point()
        lookup = _embedding_lookup(func, args, kwargs) if site is None else None
        weight = lookup[0] if lookup is not None else None if site is None else site.weight
        name = None if weight is None else self._measured_name(weight)
        self._refuse_other_uses(func, (args, kwargs), output, skip=weight if name is not None and carried else None)
        if weight is None or name is None or (lookup is not None and not carried):
            return output  # not a use of a measured weight (skipped or frozen), or one no gradient reaches
        if view_base(weight) is not None:
            raise StrategyRefused(f"'{name}' is used through a view")
        if lookup is not None:
            return self._hooked(output, _LookupRecord(name, lookup[1].detach(), lookup[2]))
        assert site is not None  # (weight is a site's)
        if site.adapter not in (LINEAR, MATMUL, CONV):
            raise StrategyRefused(f"'{name}' is used by {getattr(func, '__name__', func)}")
        layer_input = site.input
        if not isinstance(layer_input, Tensor) or layer_input.dim() < (2 if site.adapter is not CONV else weight.dim()):
            raise StrategyRefused(f"'{name}' reads an input without a sample dimension")
        if carried:
            output = self._hooked(output, _SiteRecord(name, site, layer_input.detach()))
        return output

    def _hooked(self, output: Tensor, record: _SiteRecord | _LookupRecord) -> Tensor:
        """Record a use of a measured weight, and hand on its ``output`` with the hook that reads its gradient.

        The output handed on gets "+ 0" from one scalar leaf, and the backward is asked for that leaf's
        gradient only: it then reaches every site's output and no further (no weight or input gradient is
        kept), and the hook sees the output's gradient even if the forward later changes it in place."""
        self.records.append(record)
        key = (output.dtype, output.device)
        if key not in self.zeros:
            self.zeros[key] = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
        output = output + self.zeros[key]
        output.register_hook(functools.partial(_call_weakly, self.on_gradient, record))
        return output


class FromActivations:
    """Every draw's norms from the inputs and output gradients of the affine sites (see the module text)."""

    description = "from site activations"

    def __init__(self, draws: NoiseDraws, output_shapes: list[torch.Size] | None, samples: Batch | None = None) -> None:
        """``output_shapes``: one sample's (None: those of this forward, which must then be of one sample);
        ``samples``: the draws (one sample each) measured, by default the whole init data."""
        self.draws, self.output_shapes = draws, output_shapes
        context = draws.context
        self.all_samples = context.batch if samples is None else samples
        self.samples = self.all_samples  # the kept forward's samples: all, or those of ``drawn``
        self.drawn: list[int] | None = None
        self.count = batch_size(self.samples)
        self.index = UnitIndex(context.model)
        self.parameter_names = {id(draws.units[name].tensor(context.model)): name for name in draws.names}
        self.graph: tuple[list[Tensor], list[Tensor], dict[str, int]] | None = None  # outputs, backward targets, uses
        self.channel: dict[str, Tensor] = {}
        self.slice_sums: dict[str, Tensor] = {}
        self.gradient_sums: dict[str, Tensor] = {}  # per-sample gradients of weights used at several sites
        self.sites: dict[str, int] = {}
        self.problem: str | None = None
        self.pending: DrawNorms | None = None  # a round already measured, the next one ``rounds`` gives

    def _forward(self) -> None:
        """Run and keep the batched forward, recording its affine sites (``StrategyRefused`` where it cannot
        be measured from them)."""
        context = self.draws.context
        capture = _SiteCapture(self.index, self.parameter_names, self._on_gradient)
        with torch.enable_grad(), capture:
            outputs = output_tensors(context.run(self.samples))
        if self.output_shapes is None:
            self.output_shapes = [t.shape for t in outputs]
        expected = [torch.Size((self.count, *shape[1:])) for shape in self.output_shapes]
        if [t.shape for t in outputs] != expected or any(shape[:1] != (1,) for shape in self.output_shapes):
            raise StrategyRefused("the outputs are not stacked along the sample dimension")
        sites: dict[str, int] = {}
        layouts: dict[str, set[tuple[int, int]]] = {}
        for record in capture.records:
            sites[record.name] = sites.get(record.name, 0) + 1
            if isinstance(record, _SiteRecord):
                layouts.setdefault(record.name, set()).add((id(record.site.adapter), record.site.groups))
            elif self.draws.layouts[record.name] != (LINEAR, 1):  # a lookup's rows: a linear map's output channels
                raise StrategyRefused(f"'{record.name}' is read by an embedding lookup and is not a linear map's")
        if any(len(found) > 1 for found in layouts.values()):
            raise StrategyRefused("a weight is used by affine maps of different layouts")
        for name, uses in sites.items():
            if uses > 1 and self.count * self.draws.units[name].tensor(context.model).numel() > 4 * BLOCK_FLOATS:
                raise StrategyRefused(f"'{name}' is used at {uses} sites and is too large to hold per sample")
        targets = list(capture.zeros.values())
        self.graph, self.sites = (outputs, targets, sites), sites

    def rounds(self, draws: Sequence[int] | None = None) -> Iterator[DrawNorms]:
        """One round: every sample's norms under fresh noise (one backward over the kept forward). The
        first is the round ``choose_strategy`` checked, if it left one (``pending``). ``draws``: those
        samples only, by index, in that order (the kept forward is then of them, made anew where they
        change)."""
        wanted = None if draws is None else list(draws)
        if wanted == list(range(batch_size(self.all_samples))):
            wanted = None
        if wanted != self.drawn:
            self.close()
            self.pending, self.drawn = None, wanted
            self.samples = self.all_samples if wanted is None else select_batch(self.all_samples, wanted)
            self.count = batch_size(self.samples)
        if self.pending is not None:
            pending, self.pending = self.pending, None
            yield pending
            return
        if self.graph is None:
            self._forward()
        assert self.graph is not None
        outputs, targets, _ = self.graph
        noise_draws, model = self.draws, self.draws.context.model
        assert self.output_shapes is not None  # set by the forward
        noise = noise_draws.noise(self.output_shapes, self.count)
        stacked = [torch.cat([draw[k] for draw in noise]).to(outputs[k]) for k in range(len(outputs))]
        self.channel, self.slice_sums, self.gradient_sums, self.problem = {}, {}, {}, None
        if targets:
            torch.autograd.grad(outputs, targets, grad_outputs=stacked, retain_graph=True, allow_unused=True)
        if self.problem is not None:
            raise StrategyRefused(self.problem)
        for name, total in self.gradient_sums.items():
            self._add_filter_norms(name, total)
        channel, slices = {}, {}
        for name in noise_draws.names:
            adapter, groups = noise_draws.layouts[name]
            weight = noise_draws.units[name].tensor(model)
            zeros = weight.new_zeros(self.count, adapter.out_channels(weight, groups), dtype=torch.float64)
            channel[name] = self.channel.get(name, zeros)
            if name in noise_draws.slices:
                slices[name] = self.slice_sums.get(
                    name, weight.new_zeros(self.count, len(noise_draws.slices[name]), dtype=torch.float64)
                )
        yield DrawNorms(self.count, channel, slices)

    def close(self) -> None:
        """Let go of the kept forward."""
        self.graph = None

    # per site, from the input x and the output gradient g of every sample

    def _on_gradient(self, record: _SiteRecord | _LookupRecord, grad: Tensor) -> None:
        try:
            if isinstance(record, _LookupRecord):
                self._lookup_norms(record, grad)
            else:
                self._site_norms(record, grad)
        except Exception as error:  # raised after the backward, as StrategyRefused: then another strategy is taken
            reason = str(error) if isinstance(error, StrategyRefused) else f"{type(error).__name__}: {error}"
            self.problem = self.problem or reason

    def _lookup_norms(self, record: _LookupRecord, grad: Tensor) -> None:
        """An embedding lookup's per-sample gradients of its table: each position's output gradient added to
        the row it read (none to the padding row), as filters ``(samples, 1, rows, width)``."""
        indices, name, n = record.indices, record.name, self.count
        if indices.shape[0] != n or grad.shape[0] != n:
            raise StrategyRefused(f"'{name}' is looked up with indices whose first dimension is not the samples")
        rows, width = self.draws.units[name].tensor(self.draws.context.model).shape[:2]
        per_position = grad.reshape(n, -1, width)
        indices = indices.reshape(n, -1).to(grad.device)
        if record.padding_idx is not None:
            per_position = per_position * (indices != record.padding_idx).unsqueeze(-1).to(per_position.dtype)

        def gradients() -> Iterator[tuple[slice, Tensor]]:
            for block in sample_blocks(n, rows * width):
                count = block.stop - block.start
                offsets = torch.arange(count, device=grad.device).unsqueeze(1) * rows
                filters = per_position.new_zeros(count * rows, width)
                filters.index_add_(0, (indices[block] + offsets).flatten(), per_position[block].reshape(-1, width))
                yield block, filters.reshape(count, 1, rows, width)

        self._per_sample_gradients(name, gradients(), self.sites[name] > 1, self.draws.slices.get(name))

    def _site_norms(self, record: _SiteRecord, grad: Tensor) -> None:
        x, site, name, n = record.input, record.site, record.name, self.count
        if x.dtype != grad.dtype:  # under autocast the call computed in the gradient's dtype
            x = x.to(grad.dtype)
        if x.shape[0] != n or grad.shape[0] != n:
            raise StrategyRefused(f"'{name}' is called on a tensor whose first dimension is not the samples")
        shared = self.sites[name] > 1
        sizes = self.draws.slices.get(name)
        if site.adapter is CONV:
            weight, groups = site.weight, site.groups
            positions, outputs = grad[0].numel() // weight.shape[0], weight.shape[0] // groups
            if not shared and groups == 1 and positions == 1 and x[0].numel() == weight.shape[1] == weight[0].numel():
                # one input and one output position (a squeeze-excitation block's 1x1 convolutions): a linear map
                # on one vector per sample
                self._one_vector_norms(name, grad.reshape(n, -1), x.reshape(n, -1), sizes)
                return
            if (
                not shared
                and weight.dim() in (3, 4)
                and gram_is_cheaper(positions, weight[0].numel(), outputs, grad.device)
            ):
                per_sample = gram_floats(positions, weight[0].numel() * groups, outputs * groups, groups)
                self._gram_blocks(
                    name,
                    (
                        (
                            block,
                            grad[block].reshape(block.stop - block.start, groups, outputs, -1),
                            _conv_patch_columns(site, x[block]),
                        )
                        for block in sample_blocks(n, per_sample)
                    ),
                    sizes,
                )
                return
            self._per_sample_gradients(name, self._conv_gradients(site, x, grad), shared, sizes)
            return
        rows_in, rows_out = x.reshape(n, -1, x.shape[-1]), grad.reshape(n, -1, grad.shape[-1])
        if not shared and gram_is_cheaper(rows_in.shape[1], rows_in.shape[2], rows_out.shape[2], grad.device):
            per_sample = gram_floats(rows_in.shape[1], rows_in.shape[2], rows_out.shape[2], 1)
            self._gram_blocks(
                name,
                (
                    (block, rows_out[block].transpose(1, 2).unsqueeze(1), rows_in[block].transpose(1, 2).unsqueeze(1))
                    for block in sample_blocks(n, per_sample)
                ),
                sizes,
            )
            return
        if rows_in.shape[1] == 1 and not shared:
            self._one_vector_norms(name, rows_out[:, 0], rows_in[:, 0], sizes)
            return

        def gradients() -> Iterator[tuple[slice, Tensor]]:
            per_sample = rows_out.shape[2] * rows_in.shape[2] + rows_in[0].numel()
            for block in sample_blocks(n, per_sample):  # (samples, out, in), the filters of a linear map
                yield block, torch.einsum("nto,nti->noi", rows_out[block], rows_in[block]).unsqueeze(1)

        self._per_sample_gradients(name, gradients(), shared, sizes)

    def _one_vector_norms(self, name: str, grad: Tensor, x: Tensor, sizes: tuple[int, ...] | None) -> None:
        """The norms of a weight applied to one vector per sample, ``x`` ``(n, in)`` with output gradient
        ``grad`` ``(n, out)``: the per-sample gradient ``g x^T`` has ``||g_i x||^2 = g_i^2 ||x||^2`` (no gradient
        to form), and a slice of input channels ``s`` ``sum_i g_i^2 ||x_s||^2``."""
        g_squared, x_squared = grad.double().square(), x.double().square()
        self._add(self.channel, name, g_squared * x_squared.sum(1, keepdim=True))
        if sizes is not None:
            self._add(self.slice_sums, name, g_squared.sum(1, keepdim=True) * sum_over_slices(x_squared, sizes))

    @staticmethod
    def _conv_gradients(site: SiteCall, x: Tensor, grad: Tensor) -> Iterator[tuple[slice, Tensor]]:
        weight = site.weight
        positions = grad[0].numel() // weight.shape[0]
        # per sample: its gradient, and the patch columns the weight-gradient kernel may build
        for block in sample_blocks(x.shape[0], weight.numel() + weight[0].numel() * positions):
            yield block, _conv_sample_gradients(site, x[block], grad[block])

    def _gram_blocks(
        self, name: str, blocks: Iterator[tuple[slice, Tensor, Tensor]], sizes: tuple[int, ...] | None
    ) -> None:
        """The norms of a weight used at one site, from blocks of samples' output gradients and inputs
        (``gram_norms``)."""
        channel, slices = [], []
        for _, rows_out, rows_in in blocks:
            block_channel, block_slices = gram_norms(rows_out, rows_in, sizes)
            channel.append(block_channel)
            if block_slices is not None:
                slices.append(block_slices)
        self.channel[name] = torch.cat(channel)
        if slices:
            self.slice_sums[name] = torch.cat(slices)

    def _per_sample_gradients(
        self, name: str, blocks: Iterator[tuple[slice, Tensor]], shared: bool, sizes: tuple[int, ...] | None
    ) -> None:
        """Per-sample gradients as filters ``(samples, groups, out/groups, fan_in)``: their norms, or (for a
        weight used at several sites) their sum over the sites, whose norms come after the backward."""
        if shared:
            total = self.gradient_sums.get(name)
            for block, filters in blocks:
                if total is None:
                    total = filters.new_zeros(self.count, *filters.shape[1:])
                total[block] += filters
            if total is not None:
                self.gradient_sums[name] = total
            return
        channel: list[Tensor] = []
        slices: list[Tensor] = []
        for _, filters in blocks:  # the blocks of samples, one after the other
            block_channel, block_slices = self._filter_norms(name, filters)
            channel.append(block_channel)
            if block_slices is not None:
                slices.append(block_slices)
        if channel:
            self.channel[name] = torch.cat(channel)
        if slices:
            self.slice_sums[name] = torch.cat(slices)

    def _add_filter_norms(self, name: str, filters: Tensor) -> None:
        """Add the norms of per-sample filters (``_filter_norms``) to those of ``name`` before."""
        channel, slices = self._filter_norms(name, filters)
        self._add(self.channel, name, channel)
        if slices is not None:
            self._add(self.slice_sums, name, slices)

    def _filter_norms(self, name: str, filters: Tensor) -> tuple[Tensor, Tensor | None]:
        """The squared norms of per-sample filters ``(samples, groups, out/groups, fan_in)``: of every output
        channel, and of every slice of input channels where the weight reads a concatenation
        (``squared_norms``; None where it does not)."""
        channel = squared_norms(filters, -1).flatten(1)
        sizes = self.draws.slices.get(name)
        if sizes is None:
            return channel, None
        # ungrouped filters: (samples, 1, out, inputs * kernel)
        n = filters.shape[0]
        per_input = squared_norms(filters.reshape(n, -1, sum(sizes), filters.shape[-1] // sum(sizes)), (1, 3))
        return channel, sum_over_slices(per_input, sizes)

    @staticmethod
    def _add(table: dict[str, Tensor], name: str, value: Tensor) -> None:
        table[name] = table[name] + value if name in table else value
