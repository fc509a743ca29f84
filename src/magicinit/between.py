"""Part 2 of the method: between-layer scale adjustment (equal change rates).

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

The rescaling itself is the least-squares problem of ``graph.LayerGraph.solve``:
one measurement, one solve, one application that keeps the network's function
(first checked on a float64 copy of the model, so that rounding is not
mistaken for a change), one verification.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .distributed import Collective
from .errors import MagicInitError
from .graph import LayerGraph, ScaleSolution
from .inputs import Batch, ForwardFn, batch_size, cast_floating, floating_tensors, jitter_floating, split_batch
from .layers import adapter_for
from .safety import ModelSnapshot

__all__ = [
    "RateOptions",
    "ChangeRates",
    "measure_change_rates",
    "BetweenResult",
    "equalize_between",
    "function_change",
]


@dataclass(frozen=True)
class RateOptions:
    """How change rates are estimated.

    Attributes:
        chunk_size: samples per noise draw. One sample per draw is the steadiest
            for the cost: in a larger chunk the samples' gradients add up with
            random signs, which adds variance (the reference used batches of 16).
        precision: stop when the standard error of every ``log C_k`` is below this.
        min_rounds: passes over the init data at least.
        max_rounds: passes over the init data at most.
    """

    chunk_size: int = 1
    precision: float = 0.02
    min_rounds: int = 2  # the noise error needs two rounds
    max_rounds: int = 16

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise MagicInitError(f"rate_chunk_size={self.chunk_size}: must be at least 1")
        if not self.precision > 0:
            raise MagicInitError(f"rate_precision={self.precision}: must be positive")
        if not 2 <= self.min_rounds <= self.max_rounds:
            raise MagicInitError(
                f"rate rounds: need 2 <= min_rounds ({self.min_rounds}) <= max_rounds ({self.max_rounds})"
            )


@dataclass
class ChangeRates:
    """Estimated change rates of a set of layers.

    Attributes:
        rate: ``C_k`` per layer (0 where no gradient reaches the layer).
        log_error: standard error of ``log C_k`` (the estimate's spread).
        channel_rate: per output channel ``sqrt(E||dL/dW_i||^2 / ||W_i||^2)``.
        draws: number of noise draws (chunks times rounds) averaged.
        rounds: passes over the init data.
    """

    rate: dict[str, float]
    log_error: dict[str, float]
    channel_rate: dict[str, Tensor]
    draws: int
    rounds: int


def _output_tensors(output: object) -> list[Tensor]:
    tensors = [t for t in floating_tensors(output) if t.requires_grad]
    if not tensors:
        raise MagicInitError(
            "the model's output does not depend on any initialized weight (no floating output "
            "with a gradient); pass forward=... returning the network's output tensor"
        )
    return tensors


def measure_change_rates(
    model: nn.Module,
    batch: Batch,
    forward: ForwardFn,
    layers: dict[str, nn.Module],
    generator: torch.Generator | None,
    options: RateOptions = RateOptions(),
    progress: bool = False,
    desc: str = "magicinit: change rates",
    collective: Collective | None = None,
) -> ChangeRates:
    """Estimate the change rate of every layer in ``layers`` from back-propagated noise.

    The model's parameters are not changed. Gradients are taken with
    ``torch.autograd.grad`` (no ``.grad`` is written); the weights' ``requires_grad``
    is switched on for the duration and the caller restores it. With a
    ``collective``, every rank draws its own noise (from a generator forked
    off ``generator``) over its own data, and the sums and their noise
    variances are summed over the ranks, which stop after the same round.
    """
    if collective is not None and generator is not None:
        generator = collective.fork(generator)
    names = list(layers)
    weights = [layers[name].weight for name in names]
    for weight in weights:
        weight.requires_grad_(True)
    n_samples = batch_size(batch)
    starts = list(range(0, n_samples, options.chunk_size))
    channel_sums: dict[str, Tensor] = {}  # on the model's device, summed over all draws
    draw_totals: dict[str, list[list[float]]] = {name: [] for name in names}  # [round][chunk]
    bar = tqdm(total=options.max_rounds * len(starts), desc=desc, unit="draw") if progress else None
    rounds = 0
    try:
        while rounds < options.max_rounds:
            rounds += 1
            round_totals: dict[str, list[Tensor]] = {name: [] for name in names}
            for start in starts:
                chunk = split_batch(batch, start, start + options.chunk_size)
                with torch.enable_grad():
                    outputs = _output_tensors(forward(model, chunk))
                    noise = [
                        torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t)
                        for t in outputs
                    ]
                    grads = torch.autograd.grad(outputs, weights, grad_outputs=noise, allow_unused=True)
                for name, grad in zip(names, grads):
                    module = layers[name]
                    adapter = adapter_for(module)
                    assert adapter is not None
                    if grad is None:
                        per_channel = module.weight.new_zeros(adapter.out_channels(module), dtype=torch.float64)
                    else:
                        filters = adapter.to_filters(module, grad)
                        # a float32 norm per filter (accurate to ~1e-7, and 100x faster on CPU than
                        # squaring a float64 copy of a large gradient), summed over draws in float64
                        norm_dtype = torch.promote_types(filters.dtype, torch.float32)
                        per_channel = torch.linalg.vector_norm(filters, dim=-1, dtype=norm_dtype).double().square()
                        per_channel = per_channel.flatten()
                    channel_sums[name] = channel_sums[name] + per_channel if name in channel_sums else per_channel
                    round_totals[name].append(per_channel.sum())
                if bar is not None:
                    bar.update(1)
            for name in names:  # one transfer per layer and round, not per draw
                draw_totals[name].append(torch.stack(round_totals[name]).tolist())
            if rounds >= options.min_rounds:
                errors = _log_errors(draw_totals, collective)
                if all(e <= options.precision for e in errors.values()):
                    break
    finally:
        if bar is not None:
            bar.close()
    n_draws = len(starts) * rounds
    if collective is not None:
        n_draws = collective.total(n_draws)
        channel_sums = {name: collective.sum(channel_sums[name]) for name in names}
    rate, channel_rate = {}, {}
    for name in names:
        module = layers[name]
        adapter = adapter_for(module)
        assert adapter is not None
        filters = adapter.to_filters(module).detach().double().cpu()
        channel_norm_sq = filters.square().sum(-1).flatten()
        mean_grad_sq = channel_sums[name].cpu() / n_draws
        weight_norm_sq = float(channel_norm_sq.sum())
        rate[name] = math.sqrt(float(mean_grad_sq.sum()) / weight_norm_sq) if weight_norm_sq > 0 else math.inf
        channel_rate[name] = (mean_grad_sq / channel_norm_sq).sqrt().float()
    return ChangeRates(rate, _log_errors(draw_totals, collective), channel_rate, n_draws, rounds)


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


def _norm(tensors: list[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def _difference(reference: list[Tensor], current: list[Tensor]) -> float:
    return _norm([a.double() - b.double() for a, b in zip(reference, current)])


def function_change(reference: list[Tensor], current: list[Tensor]) -> float:
    """Relative change ``||y' - y|| / ||y||`` over all output tensors."""
    norm = _norm(reference)
    return _difference(reference, current) / norm if norm > 0 else _difference(reference, current)


@dataclass
class BetweenResult:
    """What Part 2 measured and did.

    Attributes:
        before: rates before rescaling.
        after: rates re-measured with fresh noise after rescaling (None if nothing changed).
        solution: the log-scales applied (per layer input and output).
        weight_factor: factor applied to each layer's weight.
        equalized: layers whose rates entered the objective.
        excluded: layers left out of the objective, with the reason.
        function_change: relative output change caused by the rescaling, on the first init
            samples, in the model's own precision (rounding only).
        reverted: True if the rescaling would have changed the function and was not kept.
    """

    before: ChangeRates
    after: ChangeRates | None
    solution: ScaleSolution
    weight_factor: dict[str, float]
    equalized: list[str]
    excluded: dict[str, str] = field(default_factory=dict)
    function_change: float = 0.0
    reverted: bool = False


def _apply_scales(layers: dict[str, nn.Module], solution: ScaleSolution) -> dict[str, float]:
    factors = {}
    with torch.no_grad():
        for name, module in layers.items():
            if name not in solution.rho_in:
                continue
            log_weight = solution.rho_out[name] - solution.rho_in[name]
            factors[name] = math.exp(log_weight)
            if log_weight != 0.0:
                module.weight.mul_(math.exp(log_weight))
            if module.bias is not None and solution.rho_out[name] != 0.0:
                module.bias.mul_(math.exp(solution.rho_out[name]))
    return factors


FUNCTION_CHECK_SAMPLES = 32  # samples on which the rescaling is checked to keep the function
EXACT_TOLERANCE = 1e-9  # relative output change allowed in the float64 check
FLOAT64_CHECK_MAX_BYTES = 2 * 1024**3  # larger models are checked in their own precision instead


def _outputs(model: nn.Module, batch: Batch, forward: ForwardFn) -> list[Tensor]:
    with torch.no_grad():
        return [t.detach().clone() for t in floating_tensors(forward(model, batch))]


def _change_in_float64(
    model: nn.Module, probe: Batch, forward: ForwardFn, names: list[str], solution: ScaleSolution
) -> tuple[float | None, Batch]:
    """Relative output change the rescaling causes in a float64 copy of the model.

    In exact arithmetic a correct scale analysis changes nothing, so this
    separates a wrong analysis (an O(1) change) from the rounding of deep
    float32 networks (which alone can exceed 1e-4). Returns the change and the
    inputs it was measured on: ``probe``, or a jittered copy of it where the
    network's outputs on ``probe`` are cancelled down to rounding (init data
    with one sample, or constant data, makes Part 1 fit biases that cancel them
    exactly). In that case the change on ``probe`` is measured against the
    outputs' size on the jittered inputs, and the change there counts too. The
    change is None when no float64 copy can be made (too large, or not
    copyable); the model itself is not touched.
    """
    if 8 * sum(p.numel() for p in model.parameters()) > FLOAT64_CHECK_MAX_BYTES:
        return None, probe
    try:
        twin = copy.deepcopy(model).double()
    except Exception:  # a model holding something deepcopy cannot copy
        return None, probe
    twin_modules = dict(twin.named_modules())
    jittered = jitter_floating(probe, seed=0)
    probe64, jittered64 = cast_floating(probe, torch.float64), cast_floating(jittered, torch.float64)
    reference = _outputs(twin, probe64, forward)
    try:
        reference_jittered = _outputs(twin, jittered64, forward)
    except Exception:  # the model does not accept other values (indices stored as floats, say)
        reference_jittered = None
    _apply_scales({name: twin_modules[name] for name in names}, solution)
    rescaled = _outputs(twin, probe64, forward)
    change = function_change(reference, rescaled)
    if change <= EXACT_TOLERANCE or reference_jittered is None:
        return change, probe
    # Measured against the size the outputs have on other inputs, a change that is only
    # large relative to cancelled outputs becomes small; a wrong analysis stays large
    # there, and must also pass on the jittered inputs themselves.
    typical = max(_norm(reference), _norm(reference_jittered))
    change_here = _difference(reference, rescaled) / typical if typical > 0 else change
    return max(change_here, function_change(reference_jittered, _outputs(twin, jittered64, forward))), jittered


def _rounding_tolerance(model: nn.Module) -> float:
    """Output change that rounding alone may cause, when no float64 check was possible."""
    dtype = next(model.parameters()).dtype
    return max(1e-3, 50 * torch.finfo(dtype).eps)


def _warn_not_kept(change: float, where: str) -> None:
    warnings.warn(
        f"magicinit: the between-layer rescaling would change the network's output by {change:.2e} "
        f"(relative, {where}); some operation's scale behaviour was not recognized, so the model was "
        "left as it was. Please report the model to magicinit.",
        RuntimeWarning,
        stacklevel=4,
    )


def equalize_between(
    model: nn.Module,
    batch: Batch,
    forward: ForwardFn,
    layers: dict[str, nn.Module],
    graph: LayerGraph,
    fixed: set[str],
    generator: torch.Generator | None,
    options: RateOptions = RateOptions(),
    progress: bool = False,
    collective: Collective | None = None,
) -> BetweenResult:
    """Rescale ``layers`` so their change rates are as equal as the graph allows.

    Layers in ``fixed`` keep their weights and biases. The function of the
    network is kept: the rescaling is first applied to a float64 copy of the
    model and must leave its outputs on the first init samples unchanged (up
    to 1e-9, relative); otherwise it is not applied, with a warning. Where no
    float64 copy can be made, it is applied and undone again if the model's
    own outputs moved by more than rounding allows. With a ``collective``, the
    rates are those of all ranks' data and every check takes the worst rank,
    so all ranks apply the same scales or none.
    """
    called = {name: module for name, module in layers.items() if name in graph.sites}
    before = measure_change_rates(
        model, batch, forward, called, generator, options, progress, "magicinit: rates before", collective
    )
    excluded: dict[str, str] = {}
    log_rates: dict[str, float] = {}
    for name in called:
        rate = before.rate[name]
        if name in fixed:
            continue
        if rate == 0.0:
            excluded[name] = "no gradient reaches it from the output"
        elif not math.isfinite(rate):
            excluded[name] = "its weight is zero"
        else:
            log_rates[name] = math.log(rate)
    solution = graph.solve(log_rates, fixed=fixed)
    probe = split_batch(batch, 0, FUNCTION_CHECK_SAMPLES)
    analysis_error, probe = _change_in_float64(model, probe, forward, list(called), solution)
    if collective is not None and analysis_error is not None:
        analysis_error = collective.max(analysis_error)
    result = BetweenResult(before, None, solution, {name: 1.0 for name in called}, list(log_rates), excluded)
    if analysis_error is not None and analysis_error > EXACT_TOLERANCE:
        _warn_not_kept(analysis_error, "in a float64 copy of the model")
        result.reverted = True
        return result
    reference = _outputs(model, probe, forward)
    snapshot = ModelSnapshot(model) if analysis_error is None else None  # only the fallback check can undo
    factors = _apply_scales(called, solution)
    result.weight_factor = factors
    result.function_change = function_change(reference, _outputs(model, probe, forward))
    if collective is not None:
        result.function_change = collective.max(result.function_change)
    if snapshot is not None and result.function_change > _rounding_tolerance(model):
        snapshot.restore_tensors()
        _warn_not_kept(result.function_change, "in the model's own precision")
        result.reverted = True
        result.weight_factor = {name: 1.0 for name in called}
        return result
    if any(f != 1.0 for f in factors.values()):
        result.after = measure_change_rates(
            model, batch, forward, called, generator, options, progress, "magicinit: rates after", collective
        )
    else:
        result.after = before
    return result
