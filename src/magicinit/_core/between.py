"""Part 2 of the method: between-layer scale adjustment (equal change rates).

The layers' change rates are measured (``rates``); the rescaling is the
least-squares problem of ``graph.LayerGraph.solve`` (see docs/method.md): one
measurement, one solve, one application that keeps the network's function
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

from .context import PassContext
from .graph import LayerGraph, ScaleSolution
from .inputs import Batch, ForwardFn, cast_floating, floating_tensors, jitter_floating, split_batch
from .rates import ChangeRates, measure_change_rates
from .safety import ModelSnapshot
from .sites import WeightUnit


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
        after: rates re-measured with fresh noise after rescaling (``before`` itself if no
            scale changed, None if the rescaling was not kept).
        weight_factor: factor applied to each layer's weight.
        changed: layers whose weight or bias the rescaling changed (a factor other than 1).
        equalized: layers whose rates entered the objective.
        excluded: layers left out of the objective, with the reason.
        function_change: relative output change caused by the rescaling, on the first init
            samples, in the model's own precision (rounding only).
        reverted: True if the rescaling would have changed the function and was not kept.
    """

    before: ChangeRates
    after: ChangeRates | None
    weight_factor: dict[str, float]
    equalized: list[str]
    changed: set[str] = field(default_factory=set)
    excluded: dict[str, str] = field(default_factory=dict)
    function_change: float = 0.0
    reverted: bool = False


def _apply_scales(
    model: nn.Module, units: dict[str, WeightUnit], solution: ScaleSolution, graph: LayerGraph
) -> tuple[dict[str, float], set[str]]:
    """Scale every solved weight and its sites' bias parameters in ``model`` (or a copy of it),
    in place; returns the weight factors and the names of the weights whose weight or bias changed."""
    factors, changed = {}, set()
    with torch.no_grad():
        for name, unit in units.items():
            if name not in solution.rho_in:
                continue
            factors[name] = solution.weight_factor(name)
            if factors[name] != 1.0:
                unit.scale_(model, factors[name])
                changed.add(name)
            if solution.bias_factor(name) != 1.0 and graph.bias_parameters.get(name):
                for bias in graph.bias_parameters[name]:
                    model.get_parameter(bias).mul_(solution.bias_factor(name))
                changed.add(name)
    return factors, changed


FUNCTION_CHECK_SAMPLES = 32  # samples on which the rescaling is checked to keep the function
EXACT_TOLERANCE = 1e-9  # relative output change allowed in the float64 check
FLOAT64_CHECK_MAX_BYTES = 2 * 1024**3  # larger models are checked in their own precision instead


def _outputs(model: nn.Module, batch: Batch, forward: ForwardFn) -> list[Tensor]:
    with torch.no_grad():
        return [t.detach().clone() for t in floating_tensors(forward(model, batch))]


def _change_in_float64(
    context: PassContext, probe: Batch, units: dict[str, WeightUnit], solution: ScaleSolution, graph: LayerGraph
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
    model, forward = context.model, context.forward
    if 8 * sum(p.numel() for p in model.parameters()) > FLOAT64_CHECK_MAX_BYTES:
        return None, probe
    try:
        twin = copy.deepcopy(model).double()
    except Exception:  # a model holding something deepcopy cannot copy
        return None, probe
    jittered = jitter_floating(probe, seed=0)
    probe64, jittered64 = cast_floating(probe, torch.float64), cast_floating(jittered, torch.float64)
    reference = _outputs(twin, probe64, forward)
    try:
        reference_jittered = _outputs(twin, jittered64, forward)
    except Exception:  # the model does not accept other values (indices stored as floats, say)
        reference_jittered = None
    _apply_scales(twin, units, solution, graph)
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
    context: PassContext, units: dict[str, WeightUnit], graph: LayerGraph, fixed: set[str]
) -> BetweenResult:
    """Rescale the weights ``units`` so their change rates are as equal as the graph allows.

    Weights in ``fixed`` keep their weights and biases. The function of the
    network is kept: the rescaling is first applied to a float64 copy of the
    model and must leave its outputs on the first init samples unchanged (up
    to 1e-9, relative); otherwise it is not applied, with a warning. Where no
    float64 copy can be made, it is applied and undone again if the model's
    own outputs moved by more than rounding allows. With several processes,
    the rates are those of all ranks' data and every check takes the worst
    rank, so all ranks apply the same scales or none.
    """
    model, collective = context.model, context.collective
    called = {name: unit for name, unit in units.items() if name in graph.sites}
    before = measure_change_rates(context, called, graph.layouts, "magicinit: rates before")
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
    probe = split_batch(context.batch, 0, FUNCTION_CHECK_SAMPLES)
    analysis_error, probe = _change_in_float64(context, probe, called, solution, graph)
    if collective is not None and analysis_error is not None:
        analysis_error = collective.max(analysis_error)
    unchanged = {name: 1.0 for name in called}
    result = BetweenResult(before, None, unchanged, list(log_rates), excluded)
    if analysis_error is not None and analysis_error > EXACT_TOLERANCE:
        _warn_not_kept(analysis_error, "in a float64 copy of the model")
        result.reverted = True
        return result
    reference = _outputs(model, probe, context.forward)
    snapshot = ModelSnapshot(model) if analysis_error is None else None  # only the fallback check can undo
    factors, result.changed = _apply_scales(model, called, solution, graph)
    result.weight_factor = factors
    result.function_change = function_change(reference, _outputs(model, probe, context.forward))
    if collective is not None:
        result.function_change = collective.max(result.function_change)
    if snapshot is not None and result.function_change > _rounding_tolerance(model):
        snapshot.restore_tensors()
        _warn_not_kept(result.function_change, "in the model's own precision")
        result.reverted = True
        result.weight_factor, result.changed = unchanged, set()
        return result
    if result.changed:
        result.after = measure_change_rates(context, called, graph.layouts, "magicinit: rates after")
    else:
        result.after = before
    return result
