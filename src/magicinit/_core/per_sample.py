"""Squared gradient norms of every noise draw: the three ways ``rates.py`` gets them.

A *draw* is one chunk of the init data (one sample by default) with its own
Gaussian noise ``eta`` on the model's outputs; what the change rates need of it
is ``||dL/dW_i||^2`` for every output channel ``i`` of every weight (and, for
weights reading a concatenation, of every slice of input channels), under
``L = eta . output``. All three ways draw the same noise, in the same order, so
they give the same estimate:

* **from site activations** (``FromActivations``): one batched forward over the
  data, kept for every round, and per round one backward of all the draws'
  noise at once. At every affine site the input ``x`` and the output gradient
  ``g`` of each sample give its norms directly: for a linear map on one vector
  per sample ``||dL/dW_i||^2 = g_i^2 ||x||^2``; with several positions (a
  sequence, a convolution) ``g_i K g_i^T`` from the Gram matrix ``K`` of the
  sample's positions where they are few against the channels, else the
  sample's gradient ``g^T x`` is formed, for a block of samples at a time (a
  convolution's by one weight-gradient call with the samples as extra
  groups). A round costs about two backward passes. It
  needs every weight to be a plain parameter used only as the weight of
  linear maps, matrix products and convolutions (checked at every call of the
  recorded forward), and the samples not to interact (checked on the first
  and the last sample, against the same norms of each sample run alone);
  where either does not hold the next way is used. That the per-site formulas
  equal the per-sample gradients is this module's tests' job;
* **vectorized** (``Vectorized``): ``torch.func.vmap`` of the per-sample gradient;
* **one draw at a time** (``OneDrawAtATime``): a forward and backward per draw,
  for every model (reparametrized weights, random operations, chunks of several
  samples).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.func import grad as gradient_of
from torch.func import vmap

from .adapters import CONV, LINEAR, MATMUL, Layout
from .context import PassContext
from .errors import MagicInitError
from .inputs import Batch, all_tensors, batch_size, floating_tensors, map_tensors, split_batch
from .safety import Hooks
from .sites import CallInterceptor, SiteCall, UnitIndex, WeightUnit, _argument

BLOCK_FLOATS = 2**23  # per-sample gradient values held at once (32 MiB of float32)
# The check of the way from site activations: on the first and the last draw, every weight's squared gradient
# norm (summed over its channels) must agree within AGREEMENT with that of each sample run alone. Samples that
# interact differ far more; float32 rounding differs between a batch and one sample alone, and deep ReLU
# networks amplify it to about 1.5 %.
AGREEMENT = 5e-2


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


def _slice_sums(per_input: Tensor, sizes: tuple[int, ...]) -> Tensor:
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
    return _slice_sums(squared_norms(tensor, tuple(d for d in range(tensor.dim()) if d != 1)), sizes)


def squared_filter_norms(filters: Tensor) -> Tensor:
    """``||f||^2`` of every filter ``(..., fan_in)`` in float64 (``squared_norms``)."""
    return squared_norms(filters, -1)


class Estimate:
    """What the three ways share: the weights measured, their layouts, slices and the noise."""

    def __init__(self, context: PassContext, units: dict[str, WeightUnit], layouts: dict[str, Layout],
                 slices: dict[str, tuple[int, ...]], generator: torch.Generator | None) -> None:
        self.context, self.units, self.layouts, self.slices = context, units, layouts, slices
        self.generator = generator
        self.names = list(units)

    def noise(self, shapes: list[torch.Size], count: int) -> list[list[Tensor]]:
        """For each of ``count`` draws in order, float32 noise of every output shape (on the CPU
        generator's stream, so every way draws the same numbers)."""
        return [[torch.randn(shape, generator=self.generator, dtype=torch.float32) for shape in shapes]
                for _ in range(count)]

    def gradient_norms(self, grads: list[Tensor | None]) -> DrawNorms:
        """The norms of one draw from every weight's gradient (None: no gradient reached it)."""
        model, channel, slices = self.context.model, {}, {}
        for name, grad in zip(self.names, grads):
            adapter, groups = self.layouts[name]
            weight = self.units[name].tensor(model)
            if grad is None:
                channel[name] = weight.new_zeros(1, adapter.out_channels(weight, groups), dtype=torch.float64)
            else:
                channel[name] = squared_filter_norms(adapter.to_filters(grad, groups)).reshape(1, -1)
            if name in self.slices:
                sizes = self.slices[name]
                slices[name] = (squared_slice_norms(grad, sizes) if grad is not None else
                                torch.zeros(len(sizes), dtype=torch.float64, device=weight.device)).reshape(1, -1)
        return DrawNorms(1, channel, slices)

    def rng_state(self) -> Tensor:
        return self.generator.get_state() if self.generator is not None else torch.get_rng_state()

    def set_rng_state(self, state: Tensor) -> None:
        self.generator.set_state(state) if self.generator is not None else torch.set_rng_state(state)


def _output_tensors(output: object) -> list[Tensor]:
    tensors = [t for t in floating_tensors(output) if t.requires_grad]
    if tensors:
        return tensors
    if not any(True for _ in floating_tensors(output)):
        raise MagicInitError(
            f"the model's output ({type(output).__name__}) holds no floating tensor magicinit can find (it looks "
            "into tensors, tuples, lists, dicts and dataclasses); pass forward=lambda model, batch: ... returning "
            "the output tensor (e.g. model(batch).logits)"
        )
    raise MagicInitError(
        f"the model's output ({type(output).__name__}) does not depend on any initialized weight (no floating "
        "output with a gradient); pass forward=... returning the network's output tensor"
    )


# --- one draw at a time -------------------------------------------------------------------------------


class OneDrawAtATime:
    """A forward and a backward per draw (chunks of ``rate_chunk_size`` samples): works for every model."""

    description = "one sample at a time"

    def __init__(self, estimate: Estimate, hooks: Hooks) -> None:
        self.estimate = estimate
        context, units = estimate.context, estimate.units
        self.starts = list(range(0, batch_size(context.batch), context.rates.chunk_size))
        self.computed: dict[str, list[Tensor]] = {}  # a reparametrized weight as each call of its module computed it
        for name, unit in units.items():
            if unit.kind != "parameter":  # after the reparametrization's own pre-hook: its result of this call
                hooks.before(context.model.get_submodule(unit.owner),
                             lambda m, args, name=name, unit=unit: self.computed.setdefault(name, []).append(
                                 getattr(m, unit.attribute)))

    def gradients(self, start: int) -> list[Tensor | None]:
        """The gradient of every weight for the chunk at ``start``, under fresh noise."""
        estimate = self.estimate
        context, units, names = estimate.context, estimate.units, estimate.names
        chunk = split_batch(context.batch, start, start + context.rates.chunk_size)
        self.computed.clear()
        with torch.enable_grad():
            outputs = _output_tensors(context.run(chunk))
            used = [self.computed.get(name, []) if units[name].kind != "parameter"
                    else [units[name].tensor(context.model)] for name in names]
            noise = [n.to(t) for n, t in zip(estimate.noise([t.shape for t in outputs], 1)[0], outputs)]
            flat = torch.autograd.grad(outputs, [t for ts in used for t in ts], grad_outputs=noise, allow_unused=True)
        grads, position = [], 0
        for tensors in used:  # a weight's gradient: the sum over the calls that used it
            parts = [g for g in flat[position:position + len(tensors)] if g is not None]
            grads.append(None if not parts else parts[0] if len(parts) == 1 else torch.stack(parts).sum(0))
            position += len(tensors)
        return grads

    def norms(self, start: int) -> DrawNorms:
        return self.estimate.gradient_norms(self.gradients(start))

    def rounds(self) -> Iterator[DrawNorms]:
        """One round: every draw, in order."""
        return map(self.norms, self.starts)

    def close(self) -> None:
        """Nothing held between rounds."""


def _per_sample_draws_possible(context: PassContext, units: dict[str, WeightUnit]) -> str | None:
    """Why draws of one sample each cannot be batched (None: they can be tried)."""
    if not units:
        return "no weights"
    if context.rates.chunk_size != 1:
        return "rate_chunk_size is not 1"
    if any(unit.kind != "parameter" for unit in units.values()):
        return "a reparametrized weight"
    if not all(t.dim() >= 1 and t.shape[0] == batch_size(context.batch) for t in all_tensors(context.batch)):
        return "a batch entry without the sample dimension"
    return None


def _one_sample_output_shapes(context: PassContext) -> list[torch.Size]:
    """The shapes of one sample's outputs that the noise is put on: the floating ones with a gradient."""
    with torch.enable_grad():
        return [t.shape for t in floating_tensors(context.run(split_batch(context.batch, 0, 1))) if t.requires_grad]


# --- from site activations ----------------------------------------------------------------------------


class _Unsupported(MagicInitError):
    """The model cannot be measured from site activations (the message says why). A ``MagicInitError``
    so that it passes the forward's wrapper of the model's own errors unchanged; never raised to users."""


def _sample_blocks(count: int, per_sample_floats: int) -> Iterator[slice]:
    step = max(1, BLOCK_FLOATS // max(1, per_sample_floats))
    for start in range(0, count, step):
        yield slice(start, min(count, start + step))


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


_WEIGHT_GRADIENTS = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def _conv_geometry(site: SiteCall, x: Tensor) -> tuple[Tensor, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """A convolution call's input (padded here where it asked for ``padding="same"``), stride, padding and
    dilation, each a tuple over its spatial dimensions."""
    weight = site.weight
    dims = weight.dim() - 2
    stride, dilation = (_tuple(_argument(site.args, site.kwargs, slot, 1), dims)
                        for slot in ((3, "stride"), (5, "dilation")))
    padding = _argument(site.args, site.kwargs, (4, "padding"), 0)
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
        x.reshape(1, n * x.shape[1], *x.shape[2:]), (n * out, fan_in_channels, *weight.shape[2:]),
        grad.reshape(1, n * out, *grad.shape[2:]), stride, padding, dilation, n * groups)
    return per_sample.reshape(n, groups, out // groups, -1)


def _conv_patch_columns(site: SiteCall, x: Tensor) -> Tensor:
    """The input patch every output position of a 1- or 2-d convolution reads, ``(n, groups, fan_in,
    positions)``, with ``fan_in`` ordered as the weight's (input channel, then kernel position)."""
    weight, groups = site.weight, site.groups
    x, stride, padding, dilation = _conv_geometry(site, x)
    kernel = tuple(weight.shape[2:])
    if weight.dim() == 3:  # a 1-d convolution as a 2-d one of height 1
        x, kernel, stride, padding, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (0, *padding), \
            (1, *dilation)
    columns = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return columns.reshape(x.shape[0], groups, -1, columns.shape[-1])


def _gram_is_cheaper(positions: int, fan_in: int, outputs: int, device: torch.device) -> bool:
    """Whether a sample's norms cost less through the Gram matrix of its positions (``positions^2 *
    (fan_in + outputs)`` products in float64, each about two of float32 on a CPU) than by forming its
    gradient (``positions * outputs * fan_in``). On a GPU float64 runs at a small fraction of float32's
    speed, and the gradient is formed."""
    return device.type == "cpu" and positions > 1 and 2 * positions * (fan_in + outputs) < outputs * fan_in


def _gram_floats(positions: int, fan_in: int, outputs: int, groups: int) -> int:
    """Floats (float32 units) held per sample by ``_gram_norms``: the input columns in float32 and float64,
    the output gradient in float64 and its product with the Gram matrix, and the Gram matrix itself."""
    return positions * (3 * fan_in + 4 * outputs + 2 * groups * positions)


def _gram_norms(rows_out: Tensor, rows_in: Tensor, sizes: tuple[int, ...] | None) -> tuple[Tensor, Tensor | None]:
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
    return channel, torch.stack([((part.transpose(-1, -2) @ part) * outer).sum((-1, -2)) for part in parts],
                                -1).clamp_min(0.0)


@dataclass
class _SiteRecord:
    """One affine call of a measured weight in the batched forward: its input and how to read its gradient."""

    name: str
    site: SiteCall
    input: Tensor


def _call_weakly(method: "weakref.WeakMethod[Callable[[_SiteRecord, Tensor], None]]", record: _SiteRecord,
                 grad: Tensor) -> None:
    """A gradient hook's body: ``method(record, grad)`` while its object lives. The hooks sit in the kept
    graph, which the object holds: a strong reference back would make a cycle that keeps the graph alive
    after an error, until a garbage collection."""
    target = method()
    if target is not None:
        target(record, grad)


class _SiteCapture(CallInterceptor):
    """Records the affine calls of the measured weights, and hooks their outputs' gradients."""

    def __init__(self, index: UnitIndex, names: dict[int, str], on_gradient: Callable[[_SiteRecord, Tensor], None]):
        super().__init__(index)
        self.names, self.on_gradient = names, weakref.WeakMethod(on_gradient)
        self.records: list[_SiteRecord] = []
        self.zeros: dict[tuple[torch.dtype, torch.device], Tensor] = {}  # the leaves the backward is asked for

    def _measured_name(self, tensor: Tensor) -> str | None:
        """The name of the measured weight ``tensor`` is, or is a view of (None: neither)."""
        return self.names.get(id(tensor)) if tensor._base is None else self.names.get(id(tensor._base))

    def _refuse_other_uses(self, func: Callable[..., Any], arguments: object, output: object,
                           skip: Tensor | None) -> None:
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
                raise _Unsupported(f"'{name}' is used by {getattr(func, '__name__', func)}{where}, "
                                   "not only as the weight of affine maps")

    def on_call(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                site: SiteCall | None) -> Any:
        output = func(*args, **kwargs)
        weight = None if site is None else site.weight
        name = None if weight is None else self._measured_name(weight)
        carried = isinstance(output, Tensor) and output.requires_grad and output.is_floating_point()
        self._refuse_other_uses(func, (args, kwargs), output, skip=weight if name is not None and carried else None)
        if site is None or weight is None or name is None:
            return output  # not an affine call of a measured weight (skipped or frozen)
        if weight._base is not None:
            raise _Unsupported(f"'{name}' is used through a view")
        if site.adapter not in (LINEAR, MATMUL, CONV):
            raise _Unsupported(f"'{name}' is used by {getattr(func, '__name__', func)}")
        layer_input = site.input
        if not isinstance(layer_input, Tensor) or layer_input.dim() < (2 if site.adapter is not CONV else weight.dim()):
            raise _Unsupported(f"'{name}' reads an input without a sample dimension")
        if carried:
            record = _SiteRecord(name, site, layer_input.detach())
            self.records.append(record)
            # The output handed on gets "+ 0" from one scalar leaf, and the backward is asked for that leaf's
            # gradient only: it then reaches every site's output and no further (no weight or input gradient
            # is kept), and the hook sees the output's gradient even if the forward later changes it in place.
            key = (output.dtype, output.device)
            if key not in self.zeros:
                self.zeros[key] = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            output = output + self.zeros[key]
            output.register_hook(functools.partial(_call_weakly, self.on_gradient, record))
        return output


class FromActivations:
    """Every draw's norms from the inputs and output gradients of the affine sites (see the module text)."""

    description = "from site activations"

    def __init__(self, estimate: Estimate, output_shapes: list[torch.Size] | None,
                 samples: Batch | None = None) -> None:
        """``output_shapes``: one sample's (None: those of this forward, which must then be of one sample);
        ``samples``: the draws (one sample each) measured, by default the whole init data."""
        self.estimate, self.output_shapes = estimate, output_shapes
        context = estimate.context
        self.samples = context.batch if samples is None else samples
        self.count = batch_size(self.samples)
        self.index = UnitIndex(context.model)
        self.parameter_names = {id(estimate.units[name].tensor(context.model)): name for name in estimate.names}
        self.graph: tuple[list[Tensor], list[Tensor], dict[str, int]] | None = None  # outputs, backward targets, uses
        self.channel: dict[str, Tensor] = {}
        self.slice_sums: dict[str, Tensor] = {}
        self.gradient_sums: dict[str, Tensor] = {}  # per-sample gradients of weights used at several sites
        self.sites: dict[str, int] = {}
        self.problem: str | None = None
        self.pending: DrawNorms | None = None

    def _forward(self) -> None:
        context = self.estimate.context
        capture = _SiteCapture(self.index, self.parameter_names, self._on_gradient)
        with torch.enable_grad(), capture:
            outputs = _output_tensors(context.run(self.samples))
        if self.output_shapes is None:
            self.output_shapes = [t.shape for t in outputs]
        expected = [torch.Size((self.count, *shape[1:])) for shape in self.output_shapes]
        if [t.shape for t in outputs] != expected or any(shape[:1] != (1,) for shape in self.output_shapes):
            raise _Unsupported("the outputs are not stacked along the sample dimension")
        sites: dict[str, int] = {}
        layouts: dict[str, set[tuple[int, int]]] = {}
        for record in capture.records:
            sites[record.name] = sites.get(record.name, 0) + 1
            layouts.setdefault(record.name, set()).add((id(record.site.adapter), record.site.groups))
        if any(len(found) > 1 for found in layouts.values()):
            raise _Unsupported("a weight is used by affine maps of different layouts")
        for name, uses in sites.items():
            if uses > 1 and self.count * self.estimate.units[name].tensor(context.model).numel() > 4 * BLOCK_FLOATS:
                raise _Unsupported(f"'{name}' is used at {uses} sites and is too large to hold per sample")
        targets = list(capture.zeros.values())
        self.graph, self.sites = (outputs, targets, sites), sites

    def rounds(self) -> Iterator[DrawNorms]:
        """One round: every sample's norms under fresh noise (one backward over the kept forward). The
        first is the round ``choose_way`` checked, if it left one."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            yield pending
            return
        if self.graph is None:
            self._forward()
        assert self.graph is not None
        outputs, targets, _ = self.graph
        estimate, model = self.estimate, self.estimate.context.model
        assert self.output_shapes is not None  # set by the forward
        noise = estimate.noise(self.output_shapes, self.count)
        stacked = [torch.cat([draw[k] for draw in noise]).to(outputs[k]) for k in range(len(outputs))]
        self.channel, self.slice_sums, self.gradient_sums, self.problem = {}, {}, {}, None
        if targets:
            torch.autograd.grad(outputs, targets, grad_outputs=stacked, retain_graph=True, allow_unused=True)
        if self.problem is not None:
            raise _Unsupported(self.problem)
        for name, total in self.gradient_sums.items():
            self._add_filter_norms(name, total)
        channel, slices = {}, {}
        for name in estimate.names:
            adapter, groups = estimate.layouts[name]
            weight = estimate.units[name].tensor(model)
            zeros = weight.new_zeros(self.count, adapter.out_channels(weight, groups), dtype=torch.float64)
            channel[name] = self.channel.get(name, zeros)
            if name in estimate.slices:
                slices[name] = self.slice_sums.get(
                    name, weight.new_zeros(self.count, len(estimate.slices[name]), dtype=torch.float64))
        yield DrawNorms(self.count, channel, slices)

    def close(self) -> None:
        """Let go of the kept forward."""
        self.graph = None

    # per site, from the input x and the output gradient g of every sample

    def _on_gradient(self, record: _SiteRecord, grad: Tensor) -> None:
        try:
            self._site_norms(record, grad)
        except Exception as error:  # raised after the backward, as _Unsupported: then another way is taken
            reason = str(error) if isinstance(error, _Unsupported) else f"{type(error).__name__}: {error}"
            self.problem = self.problem or reason

    def _site_norms(self, record: _SiteRecord, grad: Tensor) -> None:
        x, site, name, n = record.input, record.site, record.name, self.count
        if x.dtype != grad.dtype:  # under autocast the call computed in the gradient's dtype
            x = x.to(grad.dtype)
        if x.shape[0] != n or grad.shape[0] != n:
            raise _Unsupported(f"'{name}' is called on a tensor whose first dimension is not the samples")
        shared = self.sites[name] > 1
        sizes = self.estimate.slices.get(name)
        if site.adapter is CONV:
            weight, groups = site.weight, site.groups
            positions, outputs = grad[0].numel() // weight.shape[0], weight.shape[0] // groups
            if not shared and weight.dim() in (3, 4) and _gram_is_cheaper(positions, weight[0].numel(), outputs,
                                                                            grad.device):
                per_sample = _gram_floats(positions, weight[0].numel() * groups, outputs * groups, groups)
                self._gram_blocks(name, ((block, grad[block].reshape(block.stop - block.start, groups, outputs, -1),
                                          _conv_patch_columns(site, x[block]))
                                         for block in _sample_blocks(n, per_sample)), sizes)
                return
            self._per_sample_gradients(name, self._conv_gradients(site, x, grad), shared, sizes)
            return
        rows_in, rows_out = x.reshape(n, -1, x.shape[-1]), grad.reshape(n, -1, grad.shape[-1])
        if not shared and _gram_is_cheaper(rows_in.shape[1], rows_in.shape[2], rows_out.shape[2], grad.device):
            per_sample = _gram_floats(rows_in.shape[1], rows_in.shape[2], rows_out.shape[2], 1)
            self._gram_blocks(name, ((block, rows_out[block].transpose(1, 2).unsqueeze(1),
                                      rows_in[block].transpose(1, 2).unsqueeze(1))
                                     for block in _sample_blocks(n, per_sample)), sizes)
            return
        if rows_in.shape[1] == 1 and not shared:  # one vector per sample: no per-sample gradient to form
            g_squared = rows_out[:, 0].double().square()
            x_squared = rows_in[:, 0].double().square()
            self._add(self.channel, name, g_squared * x_squared.sum(1, keepdim=True))
            if sizes is not None:
                self._add(self.slice_sums, name, g_squared.sum(1, keepdim=True) * _slice_sums(x_squared, sizes))
            return

        def gradients() -> Iterator[tuple[slice, Tensor]]:
            per_sample = rows_out.shape[2] * rows_in.shape[2] + rows_in[0].numel()
            for block in _sample_blocks(n, per_sample):  # (samples, out, in), the filters of a linear map
                yield block, torch.einsum("nto,nti->noi", rows_out[block], rows_in[block]).unsqueeze(1)

        self._per_sample_gradients(name, gradients(), shared, sizes)

    @staticmethod
    def _conv_gradients(site: SiteCall, x: Tensor, grad: Tensor) -> Iterator[tuple[slice, Tensor]]:
        weight = site.weight
        positions = grad[0].numel() // weight.shape[0]
        # per sample: its gradient, and the patch columns the weight-gradient kernel may build
        for block in _sample_blocks(x.shape[0], weight.numel() + weight[0].numel() * positions):
            yield block, _conv_sample_gradients(site, x[block], grad[block])

    def _gram_blocks(self, name: str, blocks: Iterator[tuple[slice, Tensor, Tensor]],
                     sizes: tuple[int, ...] | None) -> None:
        """The norms of a weight used at one site, from blocks of samples' output gradients and inputs
        (``_gram_norms``)."""
        channel, slices = [], []
        for _, rows_out, rows_in in blocks:
            block_channel, block_slices = _gram_norms(rows_out, rows_in, sizes)
            channel.append(block_channel)
            if block_slices is not None:
                slices.append(block_slices)
        self.channel[name] = torch.cat(channel)
        if slices:
            self.slice_sums[name] = torch.cat(slices)

    def _per_sample_gradients(self, name: str, blocks: Iterator[tuple[slice, Tensor]], shared: bool,
                              sizes: tuple[int, ...] | None) -> None:
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
        for _, filters in blocks:
            self._add_filter_norms(name, filters, append=True)
        for table in (self.channel, self.slice_sums):
            if isinstance(table.get(name), list):
                table[name] = torch.cat(table[name])

    def _add_filter_norms(self, name: str, filters: Tensor, append: bool = False) -> None:
        """The squared norms of per-sample filters ``(samples, groups, out/groups, fan_in)``: of every output
        channel, and of every slice of input channels where the weight reads a concatenation
        (``squared_norms``). With ``append``, a block of samples is appended to the ones before it."""
        values = [(self.channel, squared_norms(filters, -1).flatten(1))]
        sizes = self.estimate.slices.get(name)
        if sizes is not None:  # ungrouped filters: (samples, 1, out, inputs * kernel)
            n = filters.shape[0]
            per_input = squared_norms(filters.reshape(n, -1, sum(sizes), filters.shape[-1] // sum(sizes)), (1, 3))
            values.append((self.slice_sums, _slice_sums(per_input, sizes)))
        for table, value in values:
            if append:
                table.setdefault(name, []).append(value)
            else:
                self._add(table, name, value)

    @staticmethod
    def _add(table: dict[str, Tensor], name: str, value: Tensor) -> None:
        table[name] = table[name] + value if name in table else value


# --- vectorized -----------------------------------------------------------------------------------------


class Vectorized:
    """Per-sample gradients of many samples in one pass (``torch.func.vmap`` of ``grad``).

    Used when the way from site activations is not possible (a weight used by
    another operation, or through a view, samples that interact) but the
    forward can be vectorized (no data-dependent Python control flow, no random
    operations, no ``.item()``).
    """

    description = "vectorized per-sample gradients"

    def __init__(self, estimate: Estimate, output_shapes: list[torch.Size], fallback: OneDrawAtATime,
                 stop: int | None = None) -> None:
        self.estimate, self.output_shapes, self.fallback = estimate, output_shapes, fallback
        context = estimate.context
        self.parameters = {name: unit.tensor(context.model).detach() for name, unit in estimate.units.items()}
        size = max(1, sum(p.numel() for p in self.parameters.values()))
        self.count = batch_size(context.batch) if stop is None else stop
        self.block = max(1, min(self.count, BLOCK_FLOATS // size))
        self.loss = _NoiseLoss(context)
        self.qualified = {name: f"model.{unit.parameters[0]}" for name, unit in estimate.units.items()}
        first = next(iter(self.parameters.values()))
        self.device, self.dtype = first.device, first.dtype

    def sample_loss(self, weights: dict[str, Tensor], sample: Batch, noise: list[Tensor]) -> Tensor:
        """One sample's noise loss, with ``weights`` in place of the model's."""
        batch = map_tensors(lambda t: t.unsqueeze(0), sample)
        swapped = {self.qualified[name]: weight for name, weight in weights.items()}
        return functional_call(self.loss, swapped, (batch, noise))

    def rounds(self, strict: bool = False) -> Iterator[DrawNorms]:
        """One round, a block of samples at a time. A block the vectorized pass fails on (a sample taking
        another path) is done one sample at a time (``strict``: the failure is raised)."""
        estimate = self.estimate
        for start in range(0, self.count, self.block):
            samples = split_batch(estimate.context.batch, start, min(start + self.block, self.count))
            count = batch_size(samples)
            noise = estimate.noise(self.output_shapes, count)
            stacked = [torch.stack([n[k] for n in noise]).to(device=self.device, dtype=self.dtype)
                       for k in range(len(self.output_shapes))]
            try:
                with torch.no_grad():  # the gradients are values here, not part of an outer graph
                    grads = vmap(gradient_of(self.sample_loss), in_dims=(None, 0, 0), randomness="error")(
                        self.parameters, samples, stacked)
            except Exception:
                if strict:
                    raise
                yield from (self.fallback.norms(sample) for sample in range(start, start + count))
                continue
            per_sample = [estimate.gradient_norms([grads[name][i] for name in estimate.names]) for i in range(count)]
            yield DrawNorms(count, {name: torch.cat([d.channel[name] for d in per_sample]) for name in estimate.names},
                            {name: torch.cat([d.slices[name] for d in per_sample]) for name in estimate.slices})

    def close(self) -> None:
        """Nothing held between rounds."""


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _is_vectorization_error(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps) is torch.func's refusal to vectorize an operation."""
    text = " ".join(str(e) for e in (error, _root_cause(error))).lower()
    return any(word in text for word in ("vmap", "batching rule", "functorch", "batched tensor"))


class _NoiseLoss(nn.Module):
    """``sum(noise . output)`` of ``forward(model, batch)``, as a module ``functional_call`` can give weights to."""

    def __init__(self, context: PassContext) -> None:
        super().__init__()
        self.model = context.model
        self.run_forward = context.forward

    def forward(self, batch: Batch, noise: list[Tensor]) -> Tensor:
        outputs = list(floating_tensors(self.run_forward(self.model, batch)))
        return torch.stack([(output * n).sum() for output, n in zip(outputs, noise)]).sum()


# --- choosing -------------------------------------------------------------------------------------------

Way = FromActivations | Vectorized | OneDrawAtATime


def _agree(first: DrawNorms, second: DrawNorms) -> bool:
    """Whether two ways gave the same norms for the same draws: every weight's total over its channels (and
    every slice's) within ``AGREEMENT``. Single channels are not compared: in a deep ReLU network, float32
    rounding that differs between a batch and one sample alone flips units near zero, which moves single
    channels' norms by several percent while the totals stay put."""
    for table in ("channel", "slices"):
        ours, theirs = getattr(first, table), getattr(second, table)
        for name, value in theirs.items():
            total, other = float(value.sum()), float(ours[name].sum())
            if not abs(other - total) <= AGREEMENT * abs(total):
                return False
    return True


def _concatenated(draws: list[DrawNorms]) -> DrawNorms:
    return DrawNorms(sum(d.count for d in draws),
                     {name: torch.cat([d.channel[name] for d in draws]) for name in draws[0].channel},
                     {name: torch.cat([d.slices[name] for d in draws]) for name in draws[0].slices})


def choose_way(estimate: Estimate, loop: OneDrawAtATime) -> tuple[Way, str]:
    """The fastest way that gives this model's draws, and a description of it (with the reason where it is
    not the first). The way from site activations refuses, while it records the batched forward, a measured
    weight used other than as the weight of an affine map; the samples not interacting is checked on the
    first round's first and last samples, against the same norms of each sample run alone under the same
    noise (``_agree``), and that first round is kept for the estimate. A vectorized trial leaves the noise
    generator as it was."""
    context, units = estimate.context, estimate.units
    reason = _per_sample_draws_possible(context, units)
    if context.collective is not None and context.collective.total(0 if reason is None else 1) and reason is None:
        reason = "another process cannot batch its draws"  # every rank takes the same way
    if reason is not None:
        return loop, f"{loop.description} ({reason})"
    state = estimate.rng_state()
    count = batch_size(context.batch)
    checked = sorted({0, count - 1})  # the first sample and the last: an interaction shows in one of them
    shapes: list[torch.Size] | None = None  # one sample's output shapes, from the first sample's forward

    def alone(index: int) -> DrawNorms:
        """The norms of sample ``index`` run alone, under the next draw's noise."""
        nonlocal shapes
        single = FromActivations(estimate, shapes, split_batch(context.batch, index, index + 1))
        try:
            return _concatenated(list(single.rounds()))
        finally:
            shapes = single.output_shapes
            single.close()

    activations: FromActivations | None = None
    try:
        references = [alone(0)]
        assert shapes is not None
        if count > 1:
            estimate.noise(shapes, count - 2)  # the draws of the samples between: the last gets the round's noise
            references.append(alone(count - 1))
        reference = _concatenated(references)
        estimate.set_rng_state(state)
        activations = FromActivations(estimate, shapes)  # from here on, the whole batch at once
        first_round = _concatenated(list(activations.rounds()))
        rows = torch.tensor(checked, device=next(iter(first_round.channel.values())).device)
        samples = DrawNorms(len(checked), {name: value[rows] for name, value in first_round.channel.items()},
                            {name: value[rows] for name, value in first_round.slices.items()})
        agreed = _agree(samples, reference)
        why_not = ("its norms of the first and last samples disagreed with those of each sample alone (samples "
                   "that interact, or a random operation?)")
    except _Unsupported as unsupported:
        agreed, why_not = False, str(unsupported)
    except Exception as error:  # out of memory for the whole batch, an operation the per-site sums cannot follow
        if activations is None and isinstance(error, MagicInitError):
            # The forward's own error on one sample (guard_forward wraps it): every way would meet it. The
            # capture's own refusals are _Unsupported, and the graph trace, under a similar mode, ran before.
            raise
        agreed, why_not = False, f"{type(error).__name__}: {error}"
    except BaseException:
        if activations is not None:
            activations.close()
        raise
    if context.collective is not None and context.collective.total(0 if agreed else 1) and agreed:
        agreed, why_not = False, "another process could not use it"  # every rank takes the same way
    if agreed:
        assert activations is not None
        activations.pending = first_round
        return activations, FromActivations.description
    if activations is not None:
        activations.close()
    estimate.set_rng_state(state)
    if shapes is None:  # the first sample's forward did not get that far
        shapes = _one_sample_output_shapes(context)
    trial = min(2, batch_size(context.batch))
    vectorized = Vectorized(estimate, shapes, loop, stop=trial)
    try:
        try:
            next(iter(vectorized.rounds(strict=True)))
            refusal = None
        except Exception as error:  # an operation without a batching rule, data-dependent control flow, ...
            if not _is_vectorization_error(error):
                raise  # the forward's own error: the loop would meet it too
            refusal = type(_root_cause(error)).__name__
        if context.collective is not None and context.collective.total(0 if refusal is None else 1):
            refusal = refusal or "another process could not vectorize it"  # every rank takes the same way
        if refusal is not None:
            return loop, (f"{loop.description} (not from site activations: {why_not}; the forward could not be "
                          f"vectorized: {refusal})")
    finally:
        estimate.set_rng_state(state)
    return Vectorized(estimate, shapes, loop), f"{Vectorized.description} (not from site activations: {why_not})"
