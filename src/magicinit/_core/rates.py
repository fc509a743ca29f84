"""The relative change rate of every layer, from back-propagated Gaussian noise (Parts 2 and 4).

A layer's relative change rate is ``C_k = sqrt(E||dL/dW_k||^2 / ||W_k||^2)``
under a random linear loss ``L = eta . output`` (Gaussian noise
back-propagated from the top: no labels). It is estimated on small chunks of
the init data, each with its own noise draw: the gradient of a chunk mixes
its samples' contributions with random signs, so many small chunks give a far
steadier estimate than a few large ones at the same cost. Rounds over the
data (each chunk with fresh noise) repeat until the standard error of every
``log C_k`` is below a target. The target is the rate *on the init data*, so
the error counts only the noise: it is estimated from how much each chunk's
squared gradient norm varies between rounds, not from differences between
samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.func import grad as gradient_of
from torch.func import vmap

from .adapters import Layout
from .context import MIN_RATE_ROUNDS, PassContext
from .distributed import Collective
from .errors import MagicInitError
from .inputs import Batch, all_tensors, batch_size, floating_tensors, map_tensors, split_batch
from .safety import temporary_hooks
from .sites import WeightUnit, refreshed


@dataclass
class ChangeRates:
    """Estimated change rates of a set of layers.

    Attributes:
        rate: ``C_k`` per layer (0 where no gradient reaches the layer).
        log_error: standard error of ``log C_k`` (the estimate's spread).
        channel_rate: per output channel ``sqrt(E||dL/dW_i||^2 / ||W_i||^2)``.
        draws: number of noise draws (chunks times rounds) averaged.
        input_slice_gradient: for weights measured with ``input_slices``, ``E||dL/dW_s||^2`` of
            every slice ``s`` of their input channels (float64, on the CPU).
        method: how the per-sample gradients were computed: ``"vectorized"`` (``torch.func``,
            many samples per pass) or ``"one sample at a time"`` (with the reason).
    """

    rate: dict[str, float]
    log_error: dict[str, float]
    channel_rate: dict[str, Tensor]
    draws: int
    input_slice_gradient: dict[str, Tensor] = field(default_factory=dict)
    method: str = "one sample at a time"


def _output_tensors(output: object) -> list[Tensor]:
    tensors = [t for t in floating_tensors(output) if t.requires_grad]
    if not tensors:
        raise MagicInitError(
            "the model's output does not depend on any initialized weight (no floating output "
            "with a gradient); pass forward=... returning the network's output tensor"
        )
    return tensors


def _squared_filter_norms(weight: Tensor, layout: Layout, grad: Tensor | None) -> Tensor:
    """``||dL/dW_i||^2`` of every output channel, in float64 (zeros where no gradient reached)."""
    adapter, groups = layout
    if grad is None:
        return weight.new_zeros(adapter.out_channels(weight, groups), dtype=torch.float64)
    filters = adapter.to_filters(grad, groups)
    # a float32 norm per filter (accurate to ~1e-7, and 100x faster on CPU than
    # squaring a float64 copy of a large gradient), summed over draws in float64
    norm_dtype = torch.promote_types(filters.dtype, torch.float32)
    return torch.linalg.vector_norm(filters, dim=-1, dtype=norm_dtype).double().square().flatten()


def measure_change_rates(
    context: PassContext,
    units: dict[str, WeightUnit],
    layouts: dict[str, Layout],
    desc: str = "magicinit: change rates",
    input_slices: dict[str, tuple[int, ...]] | None = None,
) -> ChangeRates:
    """Estimate the change rate of every weight in ``units`` from back-propagated noise.

    ``layouts`` gives each weight's filter layout (``graph.LayerGraph.layouts``).
    The rate is that of the weight as the forward uses it: the parameter, or a
    reparametrization's result. For the weights in ``input_slices`` (sizes of
    consecutive slices of input channels, dimension 1), the squared gradient
    norm of every slice is averaged too. The model's parameters are not changed.
    Gradients are taken with ``torch.autograd.grad`` (no ``.grad`` is written);
    the real parameters' ``requires_grad`` is switched on for the duration and
    the caller restores it. With a
    collective, every rank draws its own noise (from a generator forked off
    the shared one) over its own data, and the sums and their noise variances
    are summed over the ranks, which stop after the same round.
    """
    options, collective = context.rates, context.collective
    generator = context.generator
    if collective is not None and generator is not None:
        generator = collective.fork(generator)
    model, names = context.model, list(units)
    for unit in units.values():
        for param in unit.real_parameters(model):
            param.requires_grad_(True)
    starts = list(range(0, batch_size(context.batch), options.chunk_size))
    channel_sums: dict[str, Tensor] = {}  # on the model's device, summed over all draws
    slices = {name: sizes for name, sizes in (input_slices or {}).items() if name in units}
    slice_sums: dict[str, Tensor] = {}
    draw_totals: dict[str, list[list[float]]] = {name: [] for name in names}  # [round][chunk]
    rounds = 0
    computed: dict[str, list[Tensor]] = {}  # a reparametrized weight as each call of its module computed it
    # the reparametrizations' attributes hold this pass's graph: recomputed without it at the end
    with context.progress_bar(options.max_rounds * len(starts), desc, unit="draw") as advance, \
            temporary_hooks() as hooks, refreshed(model, units.values()):
        for name, unit in units.items():
            if unit.kind != "parameter":  # after the reparametrization's own pre-hook: its result of this call
                hooks.before(model.get_submodule(unit.owner),
                             lambda m, args, name=name, unit=unit: computed.setdefault(name, []).append(
                                 getattr(m, unit.attribute)))
        def one_chunk(start: int) -> list[Tensor | None]:
            """The gradient of every weight for the chunk at ``start``, under fresh noise."""
            chunk = split_batch(context.batch, start, start + options.chunk_size)
            computed.clear()
            with torch.enable_grad():
                outputs = _output_tensors(context.run(chunk))
                used = [computed.get(name, []) if units[name].kind != "parameter" else [units[name].tensor(model)]
                        for name in names]
                noise = [torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t) for t in outputs]
                flat = torch.autograd.grad(outputs, [t for ts in used for t in ts], grad_outputs=noise,
                                           allow_unused=True)
            grads, position = [], 0
            for tensors in used:  # a weight's gradient: the sum over the calls that used it
                parts = [g for g in flat[position:position + len(tensors)] if g is not None]
                grads.append(None if not parts else parts[0] if len(parts) == 1 else torch.stack(parts).sum(0))
                position += len(tensors)
            return grads

        vectorized = _Vectorized.try_build(context, units, generator)
        method = "vectorized" if isinstance(vectorized, _Vectorized) else f"one sample at a time ({vectorized})"
        while rounds < options.max_rounds:
            rounds += 1
            round_totals: dict[str, list[Tensor]] = {name: [] for name in names}
            draws = vectorized.draws(names, one_chunk) if isinstance(vectorized, _Vectorized) else map(one_chunk, starts)
            for grads in draws:
                for name, grad in zip(names, grads):
                    per_channel = _squared_filter_norms(units[name].tensor(model), layouts[name], grad)
                    channel_sums[name] = channel_sums[name] + per_channel if name in channel_sums else per_channel
                    round_totals[name].append(per_channel.sum())
                    if name in slices:
                        per_slice = (squared_slice_norms(grad, slices[name]) if grad is not None
                                     else torch.zeros(len(slices[name]), dtype=torch.float64))
                        slice_sums[name] = slice_sums[name] + per_slice if name in slice_sums else per_slice
                advance(1)
            for name in names:  # one transfer per layer and round, not per draw
                draw_totals[name].append(torch.stack(round_totals[name]).tolist())
            if rounds >= MIN_RATE_ROUNDS:
                errors = _log_errors(draw_totals, collective)
                if all(e <= options.precision for e in errors.values()):
                    break
    n_draws = len(starts) * rounds
    if collective is not None:
        n_draws = collective.total(n_draws)
        channel_sums = {name: collective.sum(channel_sums[name]) for name in names}
        slice_sums = {name: collective.sum(slice_sums[name]) for name in slice_sums}
    rate, channel_rate = {}, {}
    for name in names:
        adapter, groups = layouts[name]
        filters = adapter.to_filters(units[name].tensor(model).detach(), groups).double().cpu()
        channel_norm_sq = filters.square().sum(-1).flatten()
        mean_grad_sq = channel_sums[name].cpu() / n_draws
        weight_norm_sq = float(channel_norm_sq.sum())
        rate[name] = math.sqrt(float(mean_grad_sq.sum()) / weight_norm_sq) if weight_norm_sq > 0 else math.inf
        channel_rate[name] = (mean_grad_sq / channel_norm_sq).sqrt().float()
    slice_gradient = {name: total.cpu() / n_draws for name, total in slice_sums.items()}
    return ChangeRates(rate, _log_errors(draw_totals, collective), channel_rate, n_draws, slice_gradient, method)


VECTORIZED_FLOATS = 2**23  # per-sample gradient values held at once by the vectorized pass (32 MiB of float32)


class _Vectorized:
    """Per-sample gradients of many samples in one pass (``torch.func.vmap`` of ``grad``).

    Each sample gets its own noise, drawn in the same order and shape as the
    one-sample-at-a-time loop would draw it, so it is the same estimate. Used
    when every draw is one sample (``rate_chunk_size=1``), every weight is a
    plain parameter, and the model's forward can be vectorized (no data-dependent
    Python control flow, no random operations, no ``.item()``); otherwise the loop.
    """

    def __init__(self, context: PassContext, units: dict[str, WeightUnit], generator: torch.Generator | None,
                 output_shapes: list[torch.Size]) -> None:
        self.context, self.generator, self.output_shapes = context, generator, output_shapes
        self.parameters = {name: unit.tensor(context.model).detach() for name, unit in units.items()}
        size = max(1, sum(p.numel() for p in self.parameters.values()))
        self.block = max(1, min(batch_size(context.batch), VECTORIZED_FLOATS // size))
        self.loss = _NoiseLoss(context)
        self.qualified = {name: f"model.{unit.parameters[0]}" for name, unit in units.items()}
        first = next(iter(self.parameters.values()))
        self.device, self.dtype = first.device, first.dtype

    def sample_loss(self, weights: dict[str, Tensor], sample: Batch, noise: list[Tensor]) -> Tensor:
        """One sample's noise loss, with ``weights`` in place of the model's."""
        batch = map_tensors(lambda t: t.unsqueeze(0), sample)
        swapped = {self.qualified[name]: weight for name, weight in weights.items()}
        return functional_call(self.loss, swapped, (batch, noise))

    @classmethod
    def try_build(cls, context: PassContext, units: dict[str, WeightUnit],
                  generator: torch.Generator | None) -> "_Vectorized | str":
        """The vectorized pass, tried on the first samples (the generator left as it was), or why not."""
        if not units:
            return "no weights"
        if context.rates.chunk_size != 1:
            return "rate_chunk_size is not 1"
        if any(unit.kind != "parameter" for unit in units.values()):
            return "a reparametrized weight"
        if not all(t.dim() >= 1 and t.shape[0] == batch_size(context.batch) for t in all_tensors(context.batch)):
            return "a batch entry without the sample dimension"
        with torch.no_grad():
            shapes = [t.shape for t in floating_tensors(context.run(split_batch(context.batch, 0, 1)))]
        vectorized = cls(context, units, generator, shapes)
        state = generator.get_state() if generator is not None else torch.get_rng_state()
        try:
            next(iter(vectorized.draws(list(units), None, stop=min(2, batch_size(context.batch)))))
        except Exception as error:  # an operation without a batching rule, data-dependent control flow, ...
            if not _is_vectorization_error(error):
                raise  # the forward's own error: the loop would meet it too
            return f"the forward could not be vectorized: {type(_root_cause(error)).__name__}"
        finally:
            generator.set_state(state) if generator is not None else torch.set_rng_state(state)
        return vectorized

    def draws(
        self, names: list[str], fallback: Callable[[int], list[Tensor | None]] | None, stop: int | None = None
    ) -> Iterator[list[Tensor | None]]:
        """Per sample, in order: every weight's gradient under that sample's own noise. A block the
        vectorized pass fails on (a sample taking another path) is done by ``fallback(sample)``."""
        total = batch_size(self.context.batch) if stop is None else stop
        for start in range(0, total, self.block):
            samples = split_batch(self.context.batch, start, min(start + self.block, total))
            count = batch_size(samples)
            noise = [[torch.randn(shape, generator=self.generator, dtype=torch.float32) for shape in self.output_shapes]
                     for _ in range(count)]
            stacked = [torch.stack([n[k] for n in noise]).to(device=self.device, dtype=self.dtype)
                       for k in range(len(self.output_shapes))]
            try:
                with torch.no_grad():  # the gradients are values here, not part of an outer graph
                    grads = vmap(gradient_of(self.sample_loss), in_dims=(None, 0, 0), randomness="error")(
                        self.parameters, samples, stacked)
            except Exception:
                if fallback is None:
                    raise
                yield from (fallback(sample) for sample in range(start, start + count))
                continue
            for index in range(count):
                yield [grads[name][index] for name in names]


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


def squared_slice_norms(tensor: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """Squared norms of consecutive slices of a weight-shaped ``tensor`` (a weight or its gradient)
    along the input channels (dimension 1), in float64."""
    per_input = tensor.detach().double().square().sum([d for d in range(tensor.dim()) if d != 1])
    return torch.stack([part.sum() for part in torch.split(per_input, list(sizes))])


def _log_errors(draw_totals: dict[str, list[list[float]]], collective: Collective | None = None) -> dict[str, float]:
    """Standard error of ``log C`` due to the noise, from per-(round, chunk) squared gradient norms.

    Each chunk's noise variance is estimated across rounds; with one round
    the error is unknown (inf). A layer no gradient reaches has rate 0 exactly
    (error 0). With a ``collective``, the chunks of all ranks count.
    """
    names = list(draw_totals)
    sums = torch.zeros(len(names), 2, dtype=torch.float64)  # per layer: sum of chunk means, sum of chunk variances
    rounds = len(next(iter(draw_totals.values()), []))
    for row, name in enumerate(names):
        values = torch.tensor(draw_totals[name], dtype=torch.float64)  # rounds x chunks
        sums[row, 0] = values.mean(0).sum()
        if rounds >= 2:
            sums[row, 1] = values.var(0, correction=1).sum()
    if collective is not None:
        sums = collective.sum(sums)
    errors = {}
    for row, name in enumerate(names):
        total, variance_sum = float(sums[row, 0]), float(sums[row, 1])
        if total <= 0:
            errors[name] = 0.0
        elif rounds < 2:
            errors[name] = math.inf
        else:
            errors[name] = 0.5 * math.sqrt(variance_sum / rounds) / total  # log C = 0.5 log C^2
    return errors
