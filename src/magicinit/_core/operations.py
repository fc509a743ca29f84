"""How particular operations behave when their input is scaled (Part 2).

- Normalization modules (batch, layer, group, instance, RMS norm) give the same
  output for an input scaled by ``r`` once their ``eps`` is scaled by ``r**2``
  and their running statistics by ``r`` and ``r**2`` (``NORMALIZATIONS``,
  ``compensate_normalization``).
- Any other operation can be measured on the data it meets for how far it is
  from homogeneous (``HomogeneityTest``; ``scale_mode="approximate"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .inputs import floating_tensors


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, keyword: str, default: Any) -> Any:
    return kwargs[keyword] if keyword in kwargs else args[position] if len(args) > position else default


@dataclass(frozen=True)
class NormalizationSpec:
    """Where a normalization function takes its ``eps`` and running statistics.

    Scaling its input by ``r`` keeps its output exactly when ``eps`` is
    scaled by ``r**2`` and the running mean and variance (if it uses them) by
    ``r`` and ``r**2``: possible when it is called by a module whose ``eps``
    attribute and running-statistic buffers are what it reads.
    """

    eps_position: int
    eps_default: float | None
    running_positions: tuple[int, int] | None = None

    def running(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """The running mean and variance arguments (None, None if the function has none)."""
        if self.running_positions is None:
            return None, None
        mean_at, var_at = self.running_positions
        return (_argument(args, kwargs, mean_at, "running_mean", None),
                _argument(args, kwargs, var_at, "running_var", None))

    def uses_running_statistics(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this call reads running statistics (which then scale with the input)."""
        return any(isinstance(t, Tensor) for t in self.running(args, kwargs))

    def compensation_problem(self, module: nn.Module | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """Why ``module`` cannot compensate a change of this call's input scale, or None if it can."""
        eps = _argument(args, kwargs, self.eps_position, "eps", self.eps_default)
        if module is None or not isinstance(getattr(module, "eps", None), float) or module.eps != eps:
            return "its eps is no float attribute of the module calling it, so it cannot follow the input's scale"
        mean, var = self.running(args, kwargs)
        for tensor, buffer in ((mean, "running_mean"), (var, "running_var")):
            if isinstance(tensor, Tensor) and getattr(module, buffer, None) is not tensor:
                return f"it reads running statistics that are not its module's {buffer} buffer"
        return None


NORMALIZATIONS: dict[str, NormalizationSpec] = {
    "batch_norm": NormalizationSpec(7, 1e-5, (1, 2)),
    "instance_norm": NormalizationSpec(7, 1e-5, (1, 2)),
    "layer_norm": NormalizationSpec(4, 1e-5),
    "group_norm": NormalizationSpec(4, 1e-5),
    "rms_norm": NormalizationSpec(3, None),  # eps=None follows the dtype: no float to compensate
}


@dataclass(frozen=True)
class Normalization:
    """A normalization module in the graph: its input's node and whether it keeps running statistics."""

    input_node: int
    running_statistics: bool


def compensate_normalization(module: nn.Module, log_scale: float, running_statistics: bool) -> None:
    """Make ``module`` give the same output for an input scaled by ``exp(log_scale)``: its ``eps``
    times ``exp(2 log_scale)``, its running mean and variance times ``exp(log_scale)`` and ``exp(2 log_scale)``."""
    factor = math.exp(log_scale)
    module.eps = module.eps * factor**2
    if running_statistics:
        with torch.no_grad():
            module.running_mean.mul_(factor)
            module.running_var.mul_(factor**2)


def _substitute(obj: Any, target: Tensor, replacement: Tensor) -> Any:
    """``obj`` (nested tuples, lists, dicts) with ``target`` replaced by ``replacement``."""
    if obj is target:
        return replacement
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        return type(obj)(_substitute(item, target, replacement) for item in obj)
    if isinstance(obj, dict):
        return {key: _substitute(value, target, replacement) for key, value in obj.items()}
    return obj


@dataclass(frozen=True)
class HomogeneityTest:
    """Whether an operation behaves homogeneously (degree 1) on the data it meets.

    The deviation of ``f`` at input ``x`` is the largest relative difference
    ``||f(r x) - r f(x)|| / ||r f(x)||`` over the factors ``r`` (0.5 and 2 by
    default); an operation within ``tolerance`` is tied rather than pinned.
    Part 2 then changes such an operation's input scale by at most those
    factors per round, so that it stays where it was measured.
    """

    tolerance: float
    factors: tuple[float, ...] = (0.5, 2.0)

    def deviation(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], x: Tensor) -> float | None:
        """The deviation of ``func`` in its argument ``x`` (the others held); None if it cannot be measured.

        Evaluated on copies of ``x`` (``func`` may work in place), with the random
        number generators restored afterwards (``func`` may draw). An in-place
        operation on another argument (``buffer.lerp_(x, w)``) is not measured: it
        would be applied again.
        """
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and not (args and args[0] is x):
            return None
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                base_args, base_kwargs = _substitute((args, kwargs), x, x.clone())
                base = [t.double() for t in floating_tensors(func(*base_args, **base_kwargs))]
                worst = 0.0
                for factor in self.factors:
                    new_args, new_kwargs = _substitute((args, kwargs), x, x * factor)
                    scaled = [t.double() for t in floating_tensors(func(*new_args, **new_kwargs))]
                    if len(scaled) != len(base) or any(a.shape != b.shape for a, b in zip(scaled, base)):
                        return None
                    size = math.sqrt(sum(float((factor * b).square().sum()) for b in base))
                    gap = math.sqrt(sum(float((a - factor * b).square().sum()) for a, b in zip(scaled, base)))
                    worst = max(worst, gap / size if size > 0 else (0.0 if gap == 0 else math.inf))
                return worst
        except Exception:  # an operation that does not accept other values is not homogeneous here
            return None
