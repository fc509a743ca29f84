"""Part 2 of the method: between-layer scale adjustment (equal change rates).

The layers' change rates are measured (``rates``); the rescaling is the
least-squares problem of ``solve.solve_scales`` (see docs/method.md).

- ``scale_mode="exact"``: one measurement, one solve, one application that
  keeps the network's function (first checked on a float64 copy of the model,
  so that rounding is not mistaken for a change), one verification. Where the
  graph leaves no scale free, nothing is measured.
- ``scale_mode="approximate"``: operations homogeneous on the data within a
  tolerance are tied too; then rounds of trace, measure, solve and a damped
  application, until the rates agree within their precision.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .changed_operation import changed_operation, first_changed_operation, record_calls
from .context import PassContext
from .distributed import Collective
from .errors import MagicInitError
from .graph import LayerGraph, trace_graph
from .inputs import Batch, ForwardFn, batch_size, cast_floating, floating_tensors, jitter_floating, split_batch
from .operations import HomogeneityTest, compensate_normalization
from .rates import ChangeRates, measure_change_rates, squared_slice_norms
from .safety import ModelSnapshot
from .sites import UnitIndex, WeightUnit
from .solve import ScaleSolution, can_change_rates, log_rates_after, solve_scales


def _norm(tensors: list[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def _difference(reference: list[Tensor], current: list[Tensor]) -> float:
    return _norm([a.double() - b.double() for a, b in zip(reference, current)])


class OutputsChangedShape(MagicInitError):
    """The model's outputs changed shape when only the scales of its layers changed: an operation in
    its forward selects by value (a comparison with a constant, a score threshold, top-k, NMS)."""

    def __init__(self, reference: list[Tensor], current: list[Tensor]) -> None:
        super().__init__(
            f"the model's outputs changed shape under a rescaling of its layers ({_shapes(reference)} before, "
            f"{_shapes(current)} after): an operation in its forward selects by value (a comparison with a "
            "constant, a score threshold, top-k, non-maximum suppression), so Part 2 cannot compare its outputs. "
            "Pass forward=callable(model, batch) that returns the raw outputs before the selection (a detector's "
            "head outputs before score thresholds and NMS), or between=False"
        )


def _shapes(tensors: list[Tensor]) -> str:
    shown = ", ".join(str(tuple(t.shape)) for t in tensors[:4]) + (", ..." if len(tensors) > 4 else "")
    return f"[{shown}]"


def _same_shapes(first: list[Tensor], second: list[Tensor]) -> bool:
    """Whether two lists of outputs have the same number of tensors, each of the same shape."""
    return len(first) == len(second) and all(a.shape == b.shape for a, b in zip(first, second))


def check_output_shapes(reference: list[Tensor], current: list[Tensor], collective: Collective | None) -> None:
    """Raise ``OutputsChangedShape`` (on every rank) if any rank's outputs differ in number or shape."""
    changed = not _same_shapes(reference, current)
    if collective is not None:
        changed = bool(collective.total(int(changed)))
    if changed:
        raise OutputsChangedShape(reference, current)


def function_change(reference: list[Tensor], current: list[Tensor]) -> float:
    """Relative change ``||y' - y|| / ||y||`` over all output tensors."""
    norm = _norm(reference)
    return _difference(reference, current) / norm if norm > 0 else _difference(reference, current)


def _relative_distance(reference: list[Tensor], current: list[Tensor]) -> float:
    """The relative distance of two lists of outputs (``function_change``), inf where they differ in number
    or shape (beyond any rounding)."""
    return function_change(reference, current) if _same_shapes(reference, current) else math.inf


def output_scale(reference: list[Tensor], current: list[Tensor], collective: Collective | None = None) -> float:
    """The global factor ``g`` that brings ``reference`` closest to ``current`` (``current ~ g * reference``),
    over every process's outputs."""
    sums = torch.tensor(
        [
            sum(float((a.double() * b.double()).sum()) for a, b in zip(reference, current)),
            _norm(reference) ** 2,
        ],
        dtype=torch.float64,
    )
    if collective is not None:
        sums = collective.sum(sums)
    inner, size = float(sums[0]), float(sums[1])
    return inner / size if size > 0 else 1.0


@dataclass
class BetweenResult:
    """What Part 2 measured and did.

    Attributes:
        before: rates before rescaling (None if nothing could change, so nothing was measured).
        after: rates re-measured with fresh noise after rescaling (``before`` itself if no
            scale changed, None if the rescaling was not kept).
        weight_factor: factor applied to each layer's weight.
        changed: layers whose weight or bias the rescaling changed (a factor other than 1).
        equalized: layers whose rates entered the objective.
        excluded: layers left out of the objective, with the reason.
        function_change: relative output change caused by the rescaling, on the first init
            samples, in the model's own precision (rounding only, in exact mode).
        output_scale: the global factor the outputs changed by (1 in exact mode).
        change_beyond_scale: relative output change once that factor is taken out.
        reverted: True if the rescaling would have changed the function and was not kept.
        not_kept: why, as the warning said it (None where it was kept).
        nothing_to_do: why nothing was measured or changed, when no scale was free.
        approximated: operations treated as homogeneous ("approximate" mode), with their largest
            measured deviation.
        normalizations: normalization modules whose ``eps`` (and running statistics) were
            compensated, with the factor their input was scaled by.
        rounds: rescaling rounds made.
        measurements: change-rate measurements made (approximate mode predicts the rates between its rounds
            and measures where the predicted rounds end).
    """

    before: ChangeRates | None
    after: ChangeRates | None
    weight_factor: dict[str, float]
    equalized: list[str]
    changed: set[str] = field(default_factory=set)
    excluded: dict[str, str] = field(default_factory=dict)
    function_change: float = 0.0
    output_scale: float = 1.0
    change_beyond_scale: float = 0.0
    reverted: bool = False
    not_kept: str | None = None
    nothing_to_do: str | None = None
    approximated: dict[str, float] = field(default_factory=dict)
    normalizations: dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    measurements: int = 0
    after_predicted: bool = False  # ``after`` was predicted from the exact factors, not measured
    limited: str | None = None  # what stopped the approximate rounds short, if anything did
    graph: LayerGraph | None = None  # the graph of the last round, where it differs from the session's
    instead_of_approximate: str | None = None  # approximate mode: how its rounds compared with the exact rescaling
    exact_instead: bool = False  # approximate mode: its rounds were undone, the exact rescaling (or none) kept


def _apply_scales(
    model: nn.Module, units: dict[str, WeightUnit], solution: ScaleSolution, graph: LayerGraph
) -> tuple[dict[str, float], set[str]]:
    """Scale every solved weight and its sites' bias parameters in ``model`` (or a copy of it),
    in place, and compensate the normalizations whose input scale changed; returns the weight
    factors and the names of the weights whose weight or bias changed."""
    factors, changed = {}, set()
    for module, rho in solution.normalization_rho.items():
        if rho != 0.0:
            compensate_normalization(model.get_submodule(module), rho, graph.normalizations[module])
    with torch.no_grad():
        for name, unit in units.items():
            if name not in solution.rho_in:
                continue
            slice_factors = solution.input_factors(name)
            if slice_factors is not None:  # a concatenated input: each slice's input channels apart
                sizes = graph.input_parts[name].sizes
                norms = squared_slice_norms(unit.tensor(model), sizes).tolist()
                total = sum(norms)
                factors[name] = (
                    math.sqrt(sum(n * f * f for n, f in zip(norms, slice_factors)) / total) if total > 0 else 1.0
                )  # the weight's norm ratio
                if any(factor != 1.0 for factor in slice_factors):
                    unit.scale_input_slices_(model, slice_factors, sizes)
                    changed.add(name)
            else:
                factors[name] = solution.weight_factor(name)
                if factors[name] != 1.0:
                    unit.scale_(model, factors[name])
                    changed.add(name)
            if solution.bias_factor(name) != 1.0 and graph.bias_parameters.get(name):
                for bias in graph.bias_parameters[name]:
                    model.get_parameter(bias).mul_(solution.bias_factor(name))
                changed.add(name)
    return factors, changed


FUNCTION_CHECK_SAMPLES = 32  # samples on which the rescaling is checked first, in the model's own precision
FLOAT64_CHECK_SAMPLES = 2  # the first of those, on which it is checked in a float64 copy of the model
EXACT_TOLERANCE = 1e-9  # relative output change allowed in the float64 check
FLOAT64_CHECK_MAX_BYTES = 2 * 1024**3  # larger models are checked in their own precision instead


def _outputs(model: nn.Module, batch: Batch, forward: ForwardFn) -> list[Tensor]:
    with torch.no_grad():
        return [t.detach().clone() for t in floating_tensors(forward(model, batch))]


def _change_in_float64(
    context: PassContext, probe: Batch, units: dict[str, WeightUnit], solution: ScaleSolution, graph: LayerGraph
) -> tuple[float | None, Batch, list[Tensor] | None]:
    """Relative output change the rescaling causes in a float64 copy of the model.

    In exact arithmetic a correct scale analysis changes nothing, so this
    separates a wrong analysis (an O(1) change on nearly every sample) from the
    rounding of deep float32 networks (which alone can exceed 1e-4), on the first
    ``FLOAT64_CHECK_SAMPLES`` samples of ``probe`` (float64 forwards are several
    times slower than float32 ones on a CPU; a change on a few samples only is
    the later checks' to find, on all of them). Returns the change and the
    inputs for the checks that follow: ``probe``, or a jittered copy of it where the
    network's outputs on ``probe`` are cancelled down to rounding (init data
    with one sample, or constant data, makes Part 1 fit biases that cancel them
    exactly). Cancelled outputs are looked for where the float64 change exceeds
    ``EXACT_TOLERANCE``, or where the model's own outputs are further from the
    float64 copy's than its checks allow (``_rounding_beyond_the_checks``;
    there, the outputs must also be under ``CANCELLED`` of their size on the
    jittered inputs: a selection that rounding tips is judged on ``probe``). In
    that case the change on ``probe`` is measured against the outputs' size on
    the jittered inputs, and the change there counts too. The
    change is None when no float64 copy can be made (too large, or not
    copyable); the model itself is not touched. Third: the float64 copy's outputs before the
    rescaling on the first ``FLOAT64_CHECK_SAMPLES`` of the returned inputs (None without a copy), from
    which the model's own rounding is measured.
    """
    model, forward = context.model, context.forward
    if 8 * sum(p.numel() for p in model.parameters()) > FLOAT64_CHECK_MAX_BYTES:
        return None, probe, None
    twin = _float64_twin(model)
    if twin is None:
        return None, probe, None
    probe64 = cast_floating(split_batch(probe, 0, FLOAT64_CHECK_SAMPLES), torch.float64)
    try:
        reference = _outputs(twin, probe64, forward)
    except MagicInitError:  # the forward casts (x.float()) or refuses float64: check in the model's precision
        return None, probe, None
    _apply_scales(twin, units, solution, graph)
    rescaled = _outputs(twin, probe64, forward)
    check_output_shapes(reference, rescaled, context.collective)
    change = function_change(reference, rescaled)
    settled = change <= EXACT_TOLERANCE and not _rounding_beyond_the_checks(context, probe, reference)
    if context.collective is not None:  # every rank goes on to the jittered inputs or none (collective checks)
        settled = context.collective.total(int(not settled)) == 0
    if settled:
        return change, probe, reference
    # Measured against the size the outputs have on other inputs, a change that is only
    # large relative to cancelled outputs becomes small; a wrong analysis stays large
    # there, and must also pass on the jittered inputs themselves (on a second twin: the
    # first one is rescaled).
    jittered = jitter_floating(probe, seed=0)
    jittered64 = cast_floating(split_batch(jittered, 0, FLOAT64_CHECK_SAMPLES), torch.float64)
    original = _float64_twin(model)
    try:
        assert original is not None  # the first copy succeeded
        reference_jittered = _outputs(original, jittered64, forward)
    except Exception:  # the model does not accept other values (indices stored as floats, say)
        return change, probe, reference
    del original
    typical = max(_norm(reference), _norm(reference_jittered))
    change_here = _difference(reference, rescaled) / typical if typical > 0 else change
    rescaled_jittered = _outputs(twin, jittered64, forward)
    check_output_shapes(reference_jittered, rescaled_jittered, context.collective)
    elsewhere = function_change(reference_jittered, rescaled_jittered)
    worst = math.nan if math.isnan(change_here) or math.isnan(elsewhere) else max(change_here, elsewhere)
    if change <= EXACT_TOLERANCE and not _norm(reference) < CANCELLED * _norm(reference_jittered):
        return worst, probe, reference  # not cancelled (rounding tips a selection): the checks judge ``probe``
    return worst, jittered, reference_jittered


def _rounding_beyond_the_checks(context: PassContext, probe: Batch, reference64: list[Tensor]) -> bool:
    """Whether the model's outputs on the first ``FLOAT64_CHECK_SAMPLES`` of ``probe`` are further from its
    float64 copy's (``reference64``) than the checks in its own precision allow (``_allowed_change``): outputs
    cancelled down to rounding are (a float64 copy may cancel them differently, and change nothing), and so
    are outputs that a selection tips (top-k, NMS)."""
    own = _outputs(context.model, split_batch(probe, 0, FLOAT64_CHECK_SAMPLES), context.forward)
    rounding = _relative_distance(reference64, own)
    return not rounding <= _allowed_change(context.model, rounding)


CANCELLED = 1e-3  # outputs smaller than this share of their size on jittered inputs are cancelled down to rounding


def _rounding(context: PassContext, batch: Batch, own: list[Tensor]) -> float:
    """The model's rounding on ``batch``: the relative distance of its outputs there (``own``) from those
    of a float64 copy of it (inf where no copy runs), the worst rank's."""
    rounding = math.inf
    twin = _float64_twin(context.model)
    if twin is not None:
        try:
            outputs64 = _outputs(twin, cast_floating(batch, torch.float64), context.forward)
            rounding = _relative_distance(outputs64, own)
        except MagicInitError:
            pass
    return context.collective.max(rounding) if context.collective is not None else rounding


def _float64_twin(model: nn.Module) -> nn.Module | None:
    """A float64 copy of ``model`` (None where it cannot be copied). Its floating parameters and buffers
    are converted while copying, so the float32 ones are never copied first."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point() and id(tensor) not in memo:
            twin_tensor = tensor.detach().to(torch.float64, copy=True)  # a copy even of a float64 tensor
            memo[id(tensor)] = (
                nn.Parameter(twin_tensor, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else twin_tensor
            )
    try:
        return copy.deepcopy(model, memo).double()
    except Exception:  # a model holding something deepcopy cannot copy
        return None


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())


def _rounding_tolerance(model: nn.Module) -> float:
    """Output change that rounding alone may cause, when no float64 check was possible."""
    return max(1e-3, 50 * torch.finfo(_model_dtype(model)).eps)


ROUNDING_MARGIN = 10  # a rescaling's change in the model's precision may exceed its measured rounding so much
ROUNDING_CAP = 1e-2  # and never this (relative; 10 units of rounding in bfloat16): beyond it outputs differ


def _allowed_change(model: nn.Module, rounding: float | None) -> float:
    """The largest output change that rounding explains: ``ROUNDING_MARGIN`` times the model's measured
    ``rounding`` (relative), at least 100 units of its dtype's rounding, at most ``ROUNDING_CAP`` (or 10
    units of rounding in a coarser dtype); where rounding could not be measured, ``_rounding_tolerance``."""
    if rounding is None or not math.isfinite(rounding):
        return _rounding_tolerance(model)
    eps = torch.finfo(_model_dtype(model)).eps
    return min(max(ROUNDING_MARGIN * rounding, 100 * eps), max(ROUNDING_CAP, 10 * eps))


def _worst_samples(batch: Batch, reference: list[Tensor], current: list[Tensor]) -> Batch:
    """The sample of ``batch`` whose outputs changed most (where every output has one row per sample),
    else the first ``FUNCTION_CHECK_SAMPLES``: the input on which to look for what changed."""
    count = batch_size(batch)
    if count > 1 and reference and all(t.dim() > 0 and t.shape[0] == count for t in reference):
        changes = sum(
            (a.double() - b.double()).flatten(1).square().sum(1) if a.dim() > 1 else (a.double() - b.double()).square()
            for a, b in zip(reference, current)
        )
        worst = int(torch.as_tensor(changes).argmax())
        return split_batch(batch, worst, worst + 1)
    return split_batch(batch, 0, FUNCTION_CHECK_SAMPLES)


def _warn_not_kept(
    change: float,
    where: str,
    context: PassContext,
    probe: Batch,
    cause: str | None = None,
    operation: str | None = None,
) -> str:
    """Warn that the rescaling was not kept, naming the cause: ``cause`` if known, else a forward that is
    not repeatable (a random operation), else ``operation`` (the first call whose result changed:
    ``changed_operation``), else rounding in an ill-conditioned forward; returns what it said."""
    first, second = (_outputs(context.model, probe, context.forward) for _ in range(2))
    randomness = _relative_distance(first, second)
    if cause is not None:
        pass
    elif randomness > 0:
        cause = (
            f"the forward is not repeatable: two calls on the same input differ by {randomness:.2e} "
            "(relative) in eval mode, so a random operation runs in it (dropout forced on with "
            "training=True, torch.rand, ...); pass forward=... without it"
        )
    elif operation is not None and operation.startswith("the forward"):
        cause = f"{operation}; pass forward=callable(model, batch) whose path does not depend on the values"
    elif operation is not None:
        cause = (
            f"the first operation whose result changed is {operation}. Its result depends on the scale of its "
            "input, which magicinit did not recognize: please report it. scale_mode='approximate' measures such "
            "operations on the data, or pass forward=callable(model, batch) that returns the outputs before it"
        )
    else:
        cause = (
            "no single operation's result changed beyond a positive factor, so rounding did it: the forward is "
            "ill-conditioned there (outputs that nearly cancel, or rescaling factors spread over many orders of "
            "magnitude); scale_mode='approximate' or between=False avoid it"
        )
    amount = f"by {change:.2e} (relative, {where})" if math.isfinite(change) else f"({where})"
    message = (
        f"the between-layer rescaling would change the network's output {amount}, so the model was left as it "
        f"was: {cause}"
    )
    warnings.warn(f"magicinit: {message}.", RuntimeWarning, stacklevel=4)
    return message


def _log_rates(rates: ChangeRates, names: Iterable[str], fixed: set[str]) -> tuple[dict[str, float], dict[str, str]]:
    """The log-rates that enter the objective, and the layers left out of it with the reason."""
    log_rates, excluded = {}, {}
    for name in names:
        rate = rates.rate[name]
        if name in fixed:
            continue
        if rate == 0.0:
            excluded[name] = "no gradient reaches it from the output"
        elif not math.isfinite(rate):
            excluded[name] = "its weight is zero"
        else:
            log_rates[name] = math.log(rate)
    return log_rates, excluded


NO_GRADIENT = (
    "no gradient reaches any layer from the model's outputs (every change rate measured 0): its outputs do not "
    "depend on the weights through differentiable operations (detections after score thresholds and NMS, indices, "
    "integers), so there is no rate to equalize; pass forward=callable(model, batch) that returns the raw outputs "
    "(a detector's head outputs: docs/guide.md, Detectors)"
)


def _no_gradient(rates: ChangeRates) -> bool:
    """Whether every measured rate is 0 (no layer gets a gradient)."""
    return bool(rates.rate) and all(rate == 0.0 for rate in rates.rate.values())


NOTHING_FREE = (
    "no function-keeping rescaling can change any layer's change rate relative to the others (each layer's "
    "notes say what fixes its input and output scales), so no rate was measured; magicinit.diagnose measures them"
)


def _measure(context: PassContext, units: dict[str, WeightUnit], graph: LayerGraph, desc: str) -> ChangeRates:
    """The rates of ``units``, with the slices of concatenated inputs that ``graph`` found."""
    slices = {name: concatenation.sizes for name, concatenation in graph.input_parts.items()}
    with context.stopwatch.stage("rates"):
        return measure_change_rates(context, units, graph.layouts, desc, input_slices=slices)


def _slice_shares(
    model: nn.Module, units: dict[str, WeightUnit], graph: LayerGraph, rates: ChangeRates
) -> dict[str, tuple[list[float], list[float]]]:
    """Squared gradient and weight norms of every slice of each concatenated input (``LayerGraph.solve``)."""
    shares = {}
    for name, concatenation in graph.input_parts.items():
        if name not in units or name not in rates.input_slice_gradient:
            continue
        weight_norms = squared_slice_norms(units[name].tensor(model), concatenation.sizes).tolist()
        shares[name] = (rates.input_slice_gradient[name].tolist(), weight_norms)
    return shares


def equalize_between(
    context: PassContext, units: dict[str, WeightUnit], graph: LayerGraph, fixed: set[str], index: UnitIndex
) -> BetweenResult:
    """Rescale the weights ``units`` so their change rates are as equal as the graph allows.

    Weights in ``fixed`` keep their weights and biases. In ``"exact"`` mode
    (``context.scaling``) the function of the network is kept: the rescaling
    is first applied to a float64 copy of the model and must leave its outputs
    on the first init samples unchanged (up to 1e-9, relative); otherwise it is
    not applied, with a warning. Where no float64 copy can be made, it is
    applied and undone again if the model's own outputs moved by more than
    rounding allows. Where no scale is free, nothing is measured. In
    ``"approximate"`` mode see ``_equalize_approximately``; ``index`` finds the
    weights when it traces the graph again. With several processes, the rates
    are those of all ranks' data and every check takes the worst rank, so all
    ranks apply the same scales or none.
    """
    called = {name: unit for name, unit in units.items() if name in graph.sites}
    if context.scaling.mode == "approximate":
        original = ModelSnapshot(context.model)
        approximate = _equalize_approximately(context, called, fixed, index)
        return _no_worse_than_exact(context, called, graph, fixed, approximate, original)
    unchanged = {name: 1.0 for name in called}
    if not can_change_rates(graph, [name for name in called if name not in fixed], fixed):
        return BetweenResult(None, None, unchanged, [], nothing_to_do=NOTHING_FREE)
    model = context.model
    before = _measure(context, called, graph, "magicinit: rates before")
    if _no_gradient(before):
        return BetweenResult(None, None, unchanged, [], nothing_to_do=NO_GRADIENT)
    log_rates, excluded = _log_rates(before, called, fixed)
    with context.stopwatch.stage("solve"):
        solution = solve_scales(graph, log_rates, fixed=fixed, slice_shares=_slice_shares(model, called, graph, before))
    result = BetweenResult(before, None, unchanged, list(log_rates), excluded=excluded, measurements=1)
    with context.stopwatch.stage("checks"):
        kept = _apply_exactly(context, called, graph, solution, result)
    if kept:
        _set_rates_after(context, called, graph, solution, log_rates, result)
    return result


def _set_rates_after(
    context: PassContext,
    called: dict[str, WeightUnit],
    graph: LayerGraph,
    solution: ScaleSolution,
    log_rates: dict[str, float],
    result: BetweenResult,
) -> None:
    """``result.after`` once an exact rescaling was kept: measured again (``verify_rates``), else predicted."""
    assert result.before is not None
    if result.changed and context.scaling.verify:
        result.after = _measure(context, called, graph, "magicinit: rates after")
        result.measurements += 1
    elif result.changed:
        predicted = solution.predicted_log_rate
        result.after, result.after_predicted = _predicted_rates(result.before, solution, predicted, log_rates), True
    else:
        result.after = result.before


def _spread_of(log_rates: dict[str, float]) -> float:
    """max / min of the rates whose logarithms are given (1 for none)."""
    return math.exp(max(log_rates.values()) - min(log_rates.values())) if log_rates else 1.0


SPREAD_NOISE = 4  # a measured spread exceeds the true one by up to exp(4 rate_precision) (two log-rates' noise)


def _no_worse_than_exact(
    context: PassContext,
    called: dict[str, WeightUnit],
    graph: LayerGraph,
    fixed: set[str],
    approximate: BetweenResult,
    original: ModelSnapshot,
) -> BetweenResult:
    """``approximate`` (the model as its rounds left it), unless the exact rescaling does better: where the
    spread of the rates it predicts from the rates measured before the rounds (on the session's exact
    ``graph``) is smaller than the spread the rounds ended at (measured, so beyond its noise: ``SPREAD_NOISE``),
    the model goes back to ``original`` and the
    exact rescaling is applied instead (kept only if it keeps the function: ``_apply_exactly``). A
    rounds' result that left the rates further apart than they were is undone too."""
    if approximate.before is None or approximate.after is None:
        return approximate
    model = context.model
    ended = _spread_of(_log_rates(approximate.after, approximate.equalized, fixed)[0])
    names = {name: unit for name, unit in called.items() if name in approximate.before.rate}
    log_rates, excluded = _log_rates(approximate.before, names, fixed)
    rounds_state = ModelSnapshot(model)
    original.restore()
    solution = None
    predicted = log_rates
    if approximate.approximated and can_change_rates(graph, list(log_rates), fixed):
        with context.stopwatch.stage("solve"):
            solution = solve_scales(
                graph, log_rates, fixed=fixed, slice_shares=_slice_shares(model, names, graph, approximate.before)
            )
        predicted = {**log_rates, **solution.predicted_log_rate}
    exact = _spread_of(predicted)
    if ended <= exact * math.exp(SPREAD_NOISE * context.rates.precision):  # a measured spread against a predicted one
        rounds_state.restore()
        return approximate
    unchanged = {name: 1.0 for name in called}
    result = BetweenResult(approximate.before, None, unchanged, list(log_rates), excluded=excluded)
    result.graph, result.exact_instead, result.measurements = graph, True, approximate.measurements
    if solution is not None:
        with warnings.catch_warnings():  # its warning would say the model was left as it was: the note says why not
            warnings.simplefilter("ignore", RuntimeWarning)
            with context.stopwatch.stage("checks"):
                kept = _apply_exactly(context, names, graph, solution, result)
        if not kept:
            rounds_state.restore()
            approximate.instead_of_approximate = (
                f"the exact rescaling predicted a rate spread of {exact:.3g}x against the {ended:.3g}x the rounds "
                f"ended at, but would change the function ({result.not_kept}): the rounds' result was kept"
            )
            return approximate
        _set_rates_after(context, names, graph, solution, log_rates, result)
        result.instead_of_approximate = (
            f"scale_mode='approximate' ended at a rate spread of {ended:.3g}x after {approximate.rounds} round(s) "
            f"(its output changed by {approximate.change_beyond_scale:.1e} beyond a global factor), where the exact "
            f"rescaling predicts {exact:.3g}x and keeps the function: the exact rescaling was applied instead"
        )
        return result
    result.after = approximate.before
    result.instead_of_approximate = (
        f"scale_mode='approximate' ended at a rate spread of {ended:.3g}x, wider than the {exact:.3g}x before its "
        "rounds: the model was left as it was"
    )
    return result


def _apply_exactly(
    context: PassContext,
    called: dict[str, WeightUnit],
    graph: LayerGraph,
    solution: ScaleSolution,
    result: BetweenResult,
) -> bool:
    """Apply ``solution`` to the model if it keeps the function, recording what it did in ``result``;
    whether it was kept (else the model is as it was, ``result.reverted`` is set and a warning names
    the cause).

    Checked three times: in a float64 copy on the first ``FLOAT64_CHECK_SAMPLES`` init samples (a
    wrong analysis; ``_change_in_float64``), in the model's own precision on the first
    ``FUNCTION_CHECK_SAMPLES`` (against the rounding measured on the float64 ones, or where the change
    exceeds what that explains, on all of those: a sample can be worse conditioned), and on all init
    samples, where the change may exceed the first samples' by ``ROUNDING_MARGIN`` at most: an
    operation that selects by value (a threshold crossed in one sample only) is caught there. A
    rescaling undone names the first operation whose result changed (``changed_operation``).
    """
    model, collective, forward = context.model, context.collective, context.forward
    probe = split_batch(context.batch, 0, FUNCTION_CHECK_SAMPLES)
    unchanged = dict(result.weight_factor)
    try:
        analysis_error, checked, outputs64 = _change_in_float64(context, probe, called, solution, graph)
    except OutputsChangedShape as changed:  # exact mode keeps the function or leaves the model as it was
        result.not_kept = _warn_not_kept(math.inf, "in a float64 copy of the model", context, probe, cause=str(changed))
        result.reverted = True
        return False
    if collective is not None and analysis_error is not None:
        analysis_error = collective.max(analysis_error)
    if analysis_error is not None and not analysis_error <= EXACT_TOLERANCE:  # NaN fails too
        operation = _changed_operation_in_float64(context, checked, called, solution, graph)
        result.not_kept = _warn_not_kept(
            analysis_error, "in a float64 copy of the model", context, checked, operation=operation
        )
        result.reverted = True
        return False
    beyond_probe = checked is probe and batch_size(context.batch) > batch_size(probe)  # (jittered: cancelled)
    if collective is not None:  # every rank takes part in the all-sample check's reductions, or none
        beyond_probe = bool(collective.total(int(beyond_probe)))
    reference = _outputs(model, checked, forward)
    # the model's own rounding on the first checked samples: its outputs against the float64 copy's (inf: not
    # measured); ``on_first`` where those are not all of them (on every rank, if on any)
    rounding, on_first = math.inf, outputs64 is not None and batch_size(checked) > FLOAT64_CHECK_SAMPLES
    if outputs64 is not None:
        own = _outputs(model, split_batch(checked, 0, FLOAT64_CHECK_SAMPLES), forward) if on_first else reference
        rounding = _relative_distance(outputs64, own)
    if collective is not None:
        rounding, on_first = collective.max(rounding), bool(collective.total(int(on_first)))
    reference_all = _outputs(model, context.batch, forward) if beyond_probe else None
    snapshot = ModelSnapshot(model)  # every check below undoes the rescaling through it
    result.weight_factor, result.changed = _apply_scales(model, called, solution, graph)
    result.rounds = 1
    result.normalizations = _normalization_factors(solution)

    def undo(change: float, where: str, batch: Batch, current: list[Tensor], cause: str | None = None) -> bool:
        operation = None
        if cause is None:
            before = reference_all if reference_all is not None and batch is context.batch else reference
            samples = _worst_samples(batch, before, current)
            operation = changed_operation(model, samples, forward, snapshot.restore, _model_dtype(model))
        snapshot.restore()
        result.not_kept = _warn_not_kept(change, where, context, checked, cause=cause, operation=operation)
        result.reverted = True
        result.weight_factor, result.changed, result.normalizations = unchanged, set(), {}
        result.function_change, result.output_scale, result.change_beyond_scale = 0.0, 1.0, 0.0  # as it was
        return False

    current = _outputs(model, checked, forward)
    try:
        _record_output_change(result, reference, current, collective)
    except OutputsChangedShape as changed:
        return undo(math.inf, "in the model's own precision", checked, current, cause=str(changed))
    allowed = _allowed_change(model, rounding)
    if not result.function_change <= allowed and on_first:
        # the first samples' rounding can understate the others' (a sample the forward is ill-conditioned
        # on): before the rescaling is undone, the rounding is measured on every checked sample
        snapshot.restore()
        rounding = _rounding(context, checked, reference)
        result.weight_factor, result.changed = _apply_scales(model, called, solution, graph)
        allowed = _allowed_change(model, rounding)
    if not result.function_change <= allowed:  # a selection that rounding tips (top-k, NMS) changes it, too
        where = f"in the model's own precision, where its rounding explains {allowed:.1e}"
        return undo(result.function_change, where, checked, current)
    if reference_all is not None:
        allowed = _allowed_change(model, result.function_change if math.isfinite(rounding) else None)
        current = _outputs(model, context.batch, forward)
        try:
            change = _change_on_all_samples(reference_all, current, collective, counts=checked is probe)
        except OutputsChangedShape as changed:
            return undo(math.inf, "on all init samples", context.batch, current, cause=str(changed))
        if not change <= allowed:
            where = f"on all init samples, in the model's own precision, where rounding explains {allowed:.1e}"
            return undo(change, where, context.batch, current)
        result.function_change = max(result.function_change, change)
    return True


def _change_on_all_samples(
    reference: list[Tensor], current: list[Tensor], collective: Collective | None, counts: bool
) -> float:
    """The relative output change, worst rank's (a rank whose outputs cancel on its own samples, where
    ``counts`` is False, adds 0); ``OutputsChangedShape`` on every rank if any rank's outputs changed shape."""
    changed_shape = counts and not _same_shapes(reference, current)
    change = function_change(reference, current) if counts and not changed_shape else 0.0
    if collective is not None:
        changed_shape, change = bool(collective.total(int(changed_shape))), collective.max(change)
    if changed_shape:
        raise OutputsChangedShape(reference, current)
    return change


def _changed_operation_in_float64(
    context: PassContext, checked: Batch, units: dict[str, WeightUnit], solution: ScaleSolution, graph: LayerGraph
) -> str | None:
    """The first operation whose result the rescaling changes in float64 copies of the model, on the
    sample of ``checked`` that changed most (``changed_operation``); None where none did or no copy works."""
    original, rescaled = _float64_twin(context.model), _float64_twin(context.model)
    if original is None or rescaled is None:
        return None
    try:
        _apply_scales(rescaled, units, solution, graph)
        batch = cast_floating(split_batch(checked, 0, FUNCTION_CHECK_SAMPLES), torch.float64)
        samples = _worst_samples(
            batch, _outputs(original, batch, context.forward), _outputs(rescaled, batch, context.forward)
        )
        before = record_calls(original, samples, context.forward)
        return first_changed_operation(before, record_calls(rescaled, samples, context.forward), torch.float64)
    except MagicInitError:  # outputs that change shape, a forward that refuses one sample: no name then
        return None


def _predicted_rates(
    before: ChangeRates, solution: ScaleSolution, predicted: dict[str, float], log_rates: dict[str, float]
) -> ChangeRates:
    """The rates once ``solution`` is applied, from those ``before`` (``log_rates``, their logarithms) and the
    log-rates it ``predicted`` for the layers it equalized (``log C`` moves by ``2 (rho_in - rho_out)``, or
    by the slice formula); the others keep their rates (fixed layers keep input and output scales; a rate
    of 0 or inf stays). The errors are those of the measurement before; per-channel rates move by the
    layer's factor, and a slice's squared gradient norm by its input factor's inverse squared (its weight
    is multiplied by that factor, its gradient divided)."""
    rate, channel_rate = dict(before.rate), dict(before.channel_rate)
    for name, value in predicted.items():
        factor = math.exp(value - log_rates[name])
        rate[name] = before.rate[name] * factor
        channel_rate[name] = before.channel_rate[name] * factor
    slice_gradient = dict(before.input_slice_gradient)
    for name, gradient in slice_gradient.items():
        factors = solution.input_factors(name)
        if factors is not None:
            slice_gradient[name] = gradient / torch.tensor(factors, dtype=gradient.dtype).square()
    return ChangeRates(
        rate,
        dict(before.log_error),
        channel_rate,
        before.draws,
        slice_gradient,
        before.method,
        before.rounds,
    )


def _normalization_factors(solution: ScaleSolution) -> dict[str, float]:
    return {module: math.exp(rho) for module, rho in solution.normalization_rho.items() if rho != 0.0}


def _change_beyond_scale(
    reference: list[Tensor], current: list[Tensor], collective: Collective | None
) -> tuple[float, float]:
    """The global factor between the outputs, and the relative change beyond it (worst rank's);
    ``OutputsChangedShape`` if the outputs changed shape."""
    check_output_shapes(reference, current, collective)
    scale = output_scale(reference, current, collective)
    change = function_change([scale * t.double() for t in reference], current)
    return scale, (collective.max(change) if collective is not None else change)


def _record_output_change(
    result: BetweenResult, reference: list[Tensor], current: list[Tensor], collective: Collective | None
) -> None:
    """The output change (raw, and beyond one global factor) on the check samples, worst rank's."""
    result.output_scale, result.change_beyond_scale = _change_beyond_scale(reference, current, collective)
    result.function_change = function_change(reference, current)
    if collective is not None:
        result.function_change = collective.max(result.function_change)


def _agreed_deviations(collective: Collective | None) -> Callable[[list[float]], list[float]] | None:
    """Every process's largest deviation per measured operation (processes that traced different
    operations agree on treating none as homogeneous)."""
    if collective is None:
        return None

    def agree(deviations: list[float]) -> list[float]:
        counts = collective.gather(torch.tensor([len(deviations)], dtype=torch.int64))
        if len({int(count.item()) for count in counts}) > 1:
            return [math.inf] * len(deviations)
        if not deviations:
            return []
        parts = collective.gather(torch.tensor(deviations, dtype=torch.float64))
        return torch.stack(parts).amax(0).tolist()

    return agree


def _worst_deviation(log_rates: dict[str, float]) -> float:
    """The largest distance of a log-rate from their mean."""
    if not log_rates:
        return 0.0
    mean = sum(log_rates.values()) / len(log_rates)
    return max(abs(value - mean) for value in log_rates.values())


def _rms_deviation(log_rates: dict[str, float]) -> float:
    """The root-mean-square distance of the log-rates from their mean (what the solve minimizes)."""
    if not log_rates:
        return 0.0
    mean = sum(log_rates.values()) / len(log_rates)
    return math.sqrt(sum((value - mean) ** 2 for value in log_rates.values()) / len(log_rates))


def _equalize_approximately(
    context: PassContext, called: dict[str, WeightUnit], fixed: set[str], index: UnitIndex
) -> BetweenResult:
    """Part 2 in ``"approximate"`` mode: rounds of trace, solve and damped application, measured where they end.

    Each round traces the graph again on the first init samples, tying the
    operations that are homogeneous there within the tolerance, solves for the
    rates, and applies the solution scaled down (the paper's damping) so that
    no tied operation's input moves by more than the factors it was tested at.
    The rates are measured before the first round; after a round they are the
    step's own prediction (``solve.log_rates_after``, as exact mode predicts
    its rates after), and where the predicted rounds stop they are measured,
    unless no round moved the input of an operation treated as homogeneous
    (every relation the rounds used was exact: the prediction is the rates).
    If that measurement is off the target, the rounds go on from it, measured
    after every round; a measured round that made the rates agree less halves
    the next step.
    A step that would move the outputs on those samples by more than the
    tolerance beyond one global factor is undone and halved (three times at
    most), so the operations' small deviations cannot add up past it. It stops
    when every log-rate is within three times the rate precision of their mean,
    when the solve predicts less agreement gained than the rate precision (in
    the root-mean-square spread it minimizes), after one round if it moved the
    input of no operation treated as homogeneous (the rescaling was exact), when no scale is free, when
    the output budget allows no step, or after ``max_rounds``.
    """
    model, collective, options = context.model, context.collective, context.scaling
    probe = split_batch(context.batch, 0, FUNCTION_CHECK_SAMPLES)
    test, agree = HomogeneityTest(options.tolerance), _agreed_deviations(collective)
    stopwatch = context.stopwatch
    with stopwatch.stage("checks"):
        reference = _outputs(model, probe, context.forward)
    unchanged = {name: 1.0 for name in called}

    def trace() -> LayerGraph:
        with torch.no_grad(), stopwatch.stage("retrace"):
            return trace_graph(
                model, probe, context.forward, index, test, agree, across_normalization=options.across_normalization
            )

    graph = trace()
    called = {name: unit for name, unit in called.items() if name in graph.sites}  # (this probe's path)
    result = BetweenResult(None, None, unchanged, [])
    if not can_change_rates(graph, [name for name in called if name not in fixed], fixed):
        result.nothing_to_do, result.graph = NOTHING_FREE, graph
        return result
    rates = result.before = _measure(context, called, graph, "magicinit: rates before")
    result.measurements = 1
    if _no_gradient(rates):
        result.before, result.nothing_to_do, result.graph = None, NO_GRADIENT, graph
        return result
    total = dict(unchanged)
    step, target = 1.0, 3 * context.rates.precision
    predicted = False  # ``rates`` are the last step's prediction, not a measurement
    trusted = True  # steps are predicted until a measurement finds a prediction off target
    exact_rounds = True  # no round so far moved the input of an operation treated as homogeneous: exact predictions
    while True:
        log_rates, result.excluded = _log_rates(rates, called, fixed)
        result.equalized = list(log_rates)
        spread_now = _rms_deviation(log_rates)
        stop = (
            _worst_deviation(log_rates) <= target
            or not can_change_rates(graph, log_rates, fixed)
            # every relation the rounds used exact: the first solve predicted these rates, more rounds chase noise
            or (result.rounds > 0 and exact_rounds)
            or result.rounds == options.max_rounds
        )
        solution = full = None
        if not stop:
            with stopwatch.stage("solve"):
                shares = _slice_shares(model, called, graph, rates)
                full = solve_scales(graph, log_rates, fixed=fixed, slice_shares=shares)
            # what is left is the graph's, not the last step's
            stop = spread_now - _rms_deviation(full.predicted_log_rate) <= context.rates.precision
        if full is not None and not stop:
            largest = max(full.approximated_rho.values(), default=0.0)
            limit = min(math.log(factor) if factor > 1 else -math.log(factor) for factor in test.factors)
            with stopwatch.stage("checks"):
                damped = full.damped(min(step, limit / largest) if largest > 0 else step)
                applied = _apply_within_budget(context, called, damped, graph, probe, reference)
            if applied is None:
                result.limited = (
                    f"a further step would change the output by more than scale_tolerance={options.tolerance:g} "
                    "beyond a global factor"
                )
                stop = True
            else:
                solution, factors, changed = applied
        if stop or solution is None or full is None:
            if not predicted:
                break
            # the rounds ended on a prediction: measure where they are, and go on from the measurement if the
            # prediction was off (every later round measured)
            rates = _measure(context, called, graph, f"magicinit: rates after round {result.rounds}")
            result.measurements += 1
            predicted = trusted = False
            measured, result.excluded = _log_rates(rates, called, fixed)
            result.equalized = list(measured)
            if _worst_deviation(measured) <= target or result.limited or result.rounds == options.max_rounds:
                break
            continue
        for description, deviation in graph.approximated.items():
            result.approximated[description] = max(deviation, result.approximated.get(description, 0.0))
        exact_round = not _moves_an_approximated_input(solution)
        exact_rounds = exact_rounds and exact_round
        for name, factor in _normalization_factors(solution).items():
            result.normalizations[name] = result.normalizations.get(name, 1.0) * factor
        total = {name: total[name] * factors.get(name, 1.0) for name in total}
        result.changed |= changed
        result.rounds += 1
        taken = log_rates_after(graph, log_rates, solution, fixed, shares)
        if exact_round and not options.verify:
            # every relation the step used exact (the full step, or one the output budget shortened): its
            # prediction is the rates after it, as in exact mode (a second measurement would only add its
            # noise); verify_rates=True measures them
            rates = _predicted_rates(rates, solution, taken, log_rates)
            result.after_predicted = True
            break
        graph = trace()
        called = {name: unit for name, unit in called.items() if name in graph.sites}
        if trusted:  # the step's own prediction (the homogeneity test bounds how far it can be off)
            rates, predicted = _predicted_rates(rates, solution, taken, log_rates), True
        else:
            rates = _measure(context, called, graph, f"magicinit: rates, round {result.rounds}")
            result.measurements += 1
            if _rms_deviation(_log_rates(rates, called, fixed)[0]) > spread_now:
                step /= 2
    log_rates = _log_rates(rates, called, fixed)[0]
    if options.max_rounds and result.rounds == options.max_rounds and _worst_deviation(log_rates) > target:
        result.limited = result.limited or (
            f"scale_max_rounds={options.max_rounds} rounds were made, the rates still apart"
        )
    result.weight_factor, result.after, result.graph = total, rates, graph
    with stopwatch.stage("checks"):
        _record_output_change(result, reference, _outputs(model, probe, context.forward), collective)
    return result


def _moves_an_approximated_input(solution: ScaleSolution) -> bool:
    """Whether ``solution`` changes the input scale of an operation treated as homogeneous on the data (whose
    relation is approximate): where it changes none (no such operation, or one fed by the model's input, as a
    detector's transform), every relation it uses is exact, and so are the rates it predicts."""
    return any(rho != 0.0 for rho in solution.approximated_rho.values())


BACKTRACKING_STEPS = 4  # tries of one approximate step: the full (damped) step, then halves


def _apply_within_budget(
    context: PassContext,
    units: dict[str, WeightUnit],
    solution: ScaleSolution,
    graph: LayerGraph,
    probe: Batch,
    reference: list[Tensor],
) -> tuple[ScaleSolution, dict[str, float], set[str]] | None:
    """Apply ``solution`` or a fraction of it whose outputs on the check samples ``probe`` stay within
    the tolerance of ``reference`` beyond one global factor; None (model as it was) if none does."""
    model, collective = context.model, context.collective
    snapshot = ModelSnapshot(model)
    for _ in range(BACKTRACKING_STEPS):
        factors, changed = _apply_scales(model, units, solution, graph)
        _, change = _change_beyond_scale(reference, _outputs(model, probe, context.forward), collective)
        if change <= context.scaling.tolerance:
            return solution, factors, changed
        snapshot.restore()
        solution = solution.damped(0.5)
    return None
