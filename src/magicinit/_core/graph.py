"""The layer graph and the scale freedom it leaves (the constraints of Part 2).

Every floating tensor computed in a forward pass gets a log-scale ``rho``
(docs/method.md, Part 2). Scaling affine layer k's weight by
``exp(rho_out - rho_in)`` and its bias by ``exp(rho_out)`` keeps the network's
function exactly if every other operation's scales agree:

- homogeneous operations of degree 1 (ReLU, pooling, reshapes, sums, concatenations, ...)
  *tie* their floating inputs and outputs to one scale;
- products add scales (``rho_out = rho_a + rho_b``), powers multiply them;
- a normalization module (batch, layer, group, instance or RMS norm) leaves
  the scale of its input *free* and fixes that of its output: scaling its input
  by ``r`` keeps its output when its ``eps`` is scaled by ``r**2`` and its running
  mean and variance by ``r`` and ``r**2`` (``NORMALIZATIONS``; the compensation is
  part of applying the scales);
- everything else (sigmoid, tanh, GELU, an added constant, an operation this
  module does not know) *pins* its inputs and outputs to ``rho = 0``, as do the
  model's inputs, its outputs and all constants. Optionally (``scale_mode=
  "approximate"``) such an operation with one varying input is *tied* instead
  when it behaves homogeneously on the data (``HomogeneityTest``).

These relations are recorded by a probe forward pass under a
``TorchFunctionMode`` (so arbitrary ``forward`` code works, with no tracing
restrictions), then reduced with union-find to a few linear equations. Adding
an operation is one entry in ``SCALE_RULES``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .adapters import CONV, LINEAR, Layout
from .inputs import Batch, ForwardFn, floating_tensors
from .safety import temporary_hooks
from .sites import CallInterceptor, SiteCall, UnitIndex, op_name

# Operations without a floating output that still matter: an in-place write, and
# values read into Python (whose later use the trace cannot see).
_WRITES_OR_ESCAPES = {"setitem", "item", "tolist", "float", "int"}


class ScaleGroups:
    """Union-find over tensor nodes: tied nodes share one scale; a pinned group has ``rho = 0``."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pin_reason: dict[int, str] = {}  # keyed by group root

    def add(self) -> int:
        """A new node in a group of its own."""
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, node: int) -> int:
        """The root of ``node``'s group."""
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def tie(self, nodes: Iterable[int]) -> None:
        """Put all ``nodes`` in one group (pinned if any of them was)."""
        roots = [self.find(n) for n in nodes]
        for other in roots[1:]:
            root, other = self.find(roots[0]), self.find(other)
            if root != other:
                self.parent[other] = root
                if other in self.pin_reason:
                    self.pin_reason.setdefault(root, self.pin_reason.pop(other))

    def pin(self, node: int, reason: str) -> None:
        """Fix ``node``'s group at ``rho = 0``; the first reason given is kept."""
        self.pin_reason.setdefault(self.find(node), reason)

    def reason(self, node: int) -> str | None:
        """Why ``node``'s group is pinned, or None if it is free."""
        return self.pin_reason.get(self.find(node))

    def copy(self) -> "ScaleGroups":
        """An independent copy."""
        other = ScaleGroups()
        other.parent, other.pin_reason = list(self.parent), dict(self.pin_reason)
        return other


class _Tracer(CallInterceptor):
    """Records scale relations between the tensors of one forward pass, and the affine sites."""

    def __init__(
        self, index: UnitIndex, modules: dict[str, nn.Module], homogeneity: HomogeneityTest | None = None
    ) -> None:
        super().__init__(index)
        self.modules = modules
        self.homogeneity = homogeneity
        self.groups = ScaleGroups()
        self.produced: set[int] = set()  # ids of tensors that operations computed (not constants)
        self.normalizations: dict[str, Normalization] = {}
        self.approximated: dict[str, float] = {}
        self.approximated_inputs: list[tuple[str, int]] = []
        self.concatenations: dict[int, Concatenation] = {}  # by tensor id: tensors whose slices keep own scales
        # per weight: the input node and concatenation of every site that reads one
        self.sliced_sites: dict[str, list[tuple[int, Concatenation]]] = {}
        # operations measured for homogeneity: (description, deviation, [input node, *output nodes])
        self.candidates: list[tuple[str, float, list[int]]] = []
        self.node_of: dict[int, int] = {}
        self.alive: list[Tensor] = []  # keeps ids unique while tracing
        self.equations: list[dict[int, float]] = []
        self.sites: dict[str, list[tuple[int, int]]] = {}
        self.layouts: dict[str, Layout] = {}
        self.bias_parameters: dict[str, list[str]] = {}
        self.other_uses: dict[str, list[str]] = {}
        self.scope: list[str] = []
        self.called_modules: set[str] = set()

    def node(self, tensor: Tensor, reason_if_new: str = "a constant (parameter, buffer or literal)") -> int:
        """The node of ``tensor``; a tensor seen first as an input is pinned with ``reason_if_new``."""
        key = id(tensor)
        if key not in self.node_of:
            self.node_of[key] = self.groups.add()
            self.alive.append(tensor)
            if reason_if_new:
                self.groups.pin(self.node_of[key], reason_if_new)
            else:
                self.produced.add(key)
        return self.node_of[key]

    def where(self) -> str:
        return f" in '{self.scope[-1]}'" if self.scope else ""

    def on_call(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], site: SiteCall | None
    ) -> Any:
        name = op_name(func)
        deviation = None
        if self.homogeneity is not None and site is None and name not in SCALE_RULES and name not in NORMALIZATIONS:
            varying = [t for t in floating_tensors((args, kwargs)) if id(t) in self.produced]
            if len(varying) == 1 and "out" not in kwargs:  # measured before the call: it may work in place
                deviation = self.homogeneity.deviation(func, args, kwargs, varying[0])
                deviation = math.inf if deviation is None else deviation
        out = func(*args, **kwargs)
        outputs = list(floating_tensors(out))
        if not outputs and name not in _WRITES_OR_ESCAPES:
            return out  # sizes, shapes, comparisons: no floating data flows on
        inputs = list(floating_tensors((args, kwargs)))
        in_nodes = [self.node(t) for t in inputs]
        out_nodes = [self.node(t, reason_if_new="") for t in outputs]
        op = _Op(name, args, kwargs, inputs, in_nodes, out_nodes)
        if site is not None and outputs:
            self._site(site, outputs[0])
            self._note_uses(name, [site.input] if isinstance(site.input, Tensor) else [], outputs)
            return out
        self._note_uses(name, inputs, outputs)
        if name in CONCATENATIONS and outputs and self._concatenate(op, outputs[0]):
            return out
        if any(id(t) in self.concatenations for t in inputs) and self._keeps_slices(op, inputs, outputs):
            return out
        if name in NORMALIZATIONS and outputs:
            self._normalization(op)
        elif deviation is not None and outputs:  # tied or pinned once every process's measurement is in
            varying = [n for t, n in zip(inputs, in_nodes) if id(t) in self.produced]
            self.candidates.append((f"{name}{self.where()}", deviation, varying + out_nodes))
        else:
            rule = SCALE_RULES.get(name, _pin) if outputs or name == "setitem" else _pin
            rule(self, op)
        return out

    def decide_homogeneity(self, deviations: list[float]) -> None:
        """Tie each measured operation whose deviation (one per candidate, in call order) is within the
        tolerance, and pin the others."""
        assert self.homogeneity is not None
        for (description, _, nodes), deviation in zip(self.candidates, deviations):
            if deviation <= self.homogeneity.tolerance:
                self.approximated[description] = max(deviation, self.approximated.get(description, 0.0))
                self.approximated_inputs.append((description, nodes[0]))
                self.groups.tie(nodes)
            else:
                for node in nodes:
                    self.groups.pin(node, f"{description} (not homogeneous on the data: off by {deviation:.1e})")

    def _concatenate(self, op: _Op, output: Tensor) -> bool:
        """Record a concatenation of several floating tensors as slices with scales of their own."""
        tensors = op.args[0] if op.args else op.kwargs.get("tensors")
        dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", op.kwargs.get("axis", 0))
        if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or not isinstance(dim, int):
            return False
        if not all(isinstance(t, Tensor) and t.is_floating_point() and t.dim() == output.dim() for t in tensors):
            return False
        dim = dim % output.dim()
        parts: list[int] = []
        sizes: list[int] = []
        for tensor in tensors:
            inner = self.concatenations.get(id(tensor))
            if inner is not None and inner.dim == dim:  # a concatenation of concatenations: one list of slices
                parts.extend(inner.parts)
                sizes.extend(inner.sizes)
            else:
                if inner is not None:
                    self._collapse(tensor)
                parts.append(self.node(tensor))
                sizes.append(tensor.shape[dim])
        self.concatenations[id(output)] = Concatenation(dim, tuple(parts), tuple(sizes))
        return True

    def _keeps_slices(self, op: _Op, inputs: list[Tensor], outputs: list[Tensor]) -> bool:
        """Pass a concatenation's slices through an operation that treats every slice alike and is
        homogeneous in each; otherwise give every concatenation among ``inputs`` one scale."""
        concatenated = [t for t in inputs if id(t) in self.concatenations]
        source = concatenated[0]
        concatenation = self.concatenations[id(source)]
        varying = [t for t in inputs if id(t) in self.produced]
        output = outputs[0] if len(outputs) == 1 else None
        kept = (
            len(varying) == 1 and varying[0] is source and output is not None and output.dim() == source.dim()
            and output.shape[concatenation.dim] == source.shape[concatenation.dim]
            and (
                (op.name in SLICE_WISE and output.shape == source.shape)
                or (op.name in CHANNEL_WISE and concatenation.dim == 1 and source.dim() >= 3)
            )
            and not (op.name in ("pad", "constant_pad_nd") and _pad_value(op))
        )
        if kept:
            assert output is not None
            self.concatenations[id(output)] = concatenation
            return True
        for tensor in concatenated:
            self._collapse(tensor)
        return False

    def _collapse(self, tensor: Tensor) -> None:
        """Give a concatenation one scale: its slices and the whole are tied."""
        concatenation = self.concatenations.pop(id(tensor), None)
        if concatenation is not None:
            self.groups.tie([self.node(tensor), *concatenation.parts])

    def _normalization(self, op: _Op) -> None:
        """A normalization: its output's scale is its own; its input's is free if its module can compensate."""
        spec = NORMALIZATIONS[op.name]
        where = self.where()
        for n in op.out_nodes:
            self.groups.pin(n, f"{op.name}{where}")
        data = op.args[0] if op.args else op.kwargs.get("input")
        if not isinstance(data, Tensor):
            return
        data_node = self.node(data)
        module_name = self.scope[-1] if self.scope else None
        module = self.modules.get(module_name) if module_name is not None else None
        reason = spec.compensation_problem(module, op.args, op.kwargs)
        if reason is not None:
            self.groups.pin(data_node, f"{op.name}{where} ({reason})")
            return
        assert module_name is not None
        known = self.normalizations.get(module_name)
        if known is None:
            self.normalizations[module_name] = Normalization(data_node, spec.uses_running_statistics(op.args, op.kwargs))
        else:  # one eps for every call of the module: one scale
            self.groups.tie([known.input_node, data_node])

    def _site(self, site: SiteCall, output: Tensor) -> None:
        """Record one call of an affine site: its input and output nodes, its bias and its layout."""
        unit = site.unit.name
        concatenation = self.concatenations.get(id(site.input))
        if concatenation is not None:
            adapter, groups = site.layout
            sliceable = not site.through_view and site.unit.kind in ("parameter", "weight_norm", "prune") and (
                (adapter is CONV and groups == 1 and concatenation.dim == 1)
                or (adapter is LINEAR and concatenation.dim == site.input.dim() - 1)
            )
            if not sliceable:
                self._collapse(site.input)
        input_node, output_node = self.node(site.input), self.node(output)
        if concatenation is not None and id(site.input) in self.concatenations:
            self.sliced_sites.setdefault(unit, []).append((input_node, concatenation))
        self.sites.setdefault(unit, []).append((input_node, output_node))
        self.layouts.setdefault(unit, site.layout)
        bias = site.bias
        if bias is not None:
            parameter = self.index.writable(bias)
            if parameter is None:
                self.groups.pin(output_node, f"a bias that is no parameter, or frozen, or skipped{self.where()}")
            elif parameter not in self.bias_parameters.setdefault(unit, []):
                self.bias_parameters[unit].append(parameter)

    def _note_uses(self, name: str, inputs: list[Tensor], outputs: list[Tensor]) -> None:
        """Remember where a parameter that is a weight somewhere is used other than at a site (views aside)."""
        for tensor in inputs:
            unit = self.index.resolve(tensor)
            if unit is None or unit.kind != "parameter":
                continue
            root = tensor._base if tensor._base is not None else tensor
            if outputs and all(out is tensor or out._base is root for out in outputs):
                continue  # the weight itself (a no-op .to, .contiguous) or a view of it: its uses are what count
            self.other_uses.setdefault(unit.name, []).append(f"{name}{self.where()}")


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
        number generators restored afterwards (``func`` may draw).
        """
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


CONCATENATIONS = {"cat", "concat", "concatenate"}
# operations that act on every element alike and are homogeneous: a concatenation's slices pass through
SLICE_WISE = {"relu", "leaky_relu", "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_alpha_dropout",
              "alpha_dropout", "clone", "contiguous", "detach", "to", "float", "double", "half", "bfloat16", "type",
              "cpu", "cuda", "abs", "neg", "positive"}
# operations over the spatial dimensions of each channel (dimension 1) alone
CHANNEL_WISE = {"max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
                "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
                "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
                "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices",
                "adaptive_max_pool3d_with_indices", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
                "pad", "constant_pad_nd"}


@dataclass(frozen=True)
class Concatenation:
    """A tensor concatenated from parts along ``dim``, each part with a scale of its own (or what
    slice-wise operations made of it): the node and size of every part."""

    dim: int
    parts: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass
class _Op:
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: list[Tensor]
    in_nodes: list[int]
    out_nodes: list[int]


ScaleRule = Callable[[_Tracer, _Op], None]


def _pin(tracer: _Tracer, op: _Op) -> None:
    reason = f"{op.name}{tracer.where()}"
    for n in op.in_nodes + op.out_nodes:
        tracer.groups.pin(n, reason)


def _tie(tracer: _Tracer, op: _Op) -> None:
    tracer.groups.tie(op.in_nodes + op.out_nodes)


def _tie_first(tracer: _Tracer, op: _Op) -> None:
    """Output scales with the first input; other inputs (shapes, weights) are constants."""
    tracer.groups.tie(op.in_nodes[:1] + op.out_nodes)


def _numbers(op: _Op, skip: tuple[str, ...] = ()) -> list[float]:
    values = [a for a in op.args if isinstance(a, numbers.Number) and not isinstance(a, bool)]
    values += [v for k, v in op.kwargs.items() if k not in skip and isinstance(v, numbers.Number) and not isinstance(v, bool)]
    return [float(v) for v in values]


def _additive(tracer: _Tracer, op: _Op) -> None:
    """Sums: all operands share one scale; a non-zero constant operand pins them."""
    if any(v != 0 for v in _numbers(op, skip=("alpha",))):
        _pin(tracer, op)
    else:
        _tie(tracer, op)


def _product(sign_of_second: float) -> ScaleRule:
    def rule(tracer: _Tracer, op: _Op) -> None:
        if len(op.in_nodes) < 2:
            _tie(tracer, op)
            return
        for out in op.out_nodes:
            equation = {out: 1.0}
            for position, n in enumerate(op.in_nodes):
                coefficient = -1.0 if position == 0 else -sign_of_second
                equation[n] = equation.get(n, 0.0) + coefficient
            tracer.equations.append(equation)

    return rule


def _multilinear(tracer: _Tracer, op: _Op) -> None:
    for out in op.out_nodes:
        equation = {out: 1.0}
        for n in op.in_nodes:
            equation[n] = equation.get(n, 0.0) - 1.0
        tracer.equations.append(equation)


def _bilinear(tracer: _Tracer, op: _Op) -> None:
    """``x1^T W x2 + b``: multilinear in its inputs; a bias (a constant) fixes the output's scale."""
    bias = op.kwargs.get("bias", op.args[3] if len(op.args) > 3 else None)
    if isinstance(bias, Tensor):
        for out in op.out_nodes:
            tracer.groups.pin(out, f"{op.name}{tracer.where()} (its bias)")
    _multilinear(tracer, op)


def _power(exponent: float | None) -> ScaleRule:
    def rule(tracer: _Tracer, op: _Op) -> None:
        values = _numbers(op) if exponent is None else [exponent]
        if len(op.in_nodes) != 1 or len(values) != 1:
            _pin(tracer, op)
            return
        for out in op.out_nodes:
            tracer.equations.append({out: 1.0, op.in_nodes[0]: -values[0]})

    return rule


def _reciprocal(tracer: _Tracer, op: _Op) -> None:
    """``c / x``: scale -rho."""
    _power(-1.0)(tracer, op)


def _clamp(tracer: _Tracer, op: _Op) -> None:
    low = op.kwargs.get("min", op.args[1] if len(op.args) > 1 else None)
    high = op.kwargs.get("max", op.args[2] if len(op.args) > 2 else None)
    if high is None and (low is None or (isinstance(low, numbers.Number) and low == 0)):
        _tie(tracer, op)
    else:
        _pin(tracer, op)


def _pad_value(op: _Op) -> Any:
    """The constant a ``pad``/``constant_pad_nd`` call fills with (None or 0: homogeneous)."""
    position = 3 if op.name == "pad" else 2
    return op.kwargs.get("value", op.args[position] if len(op.args) > position else None)


def _pad(tracer: _Tracer, op: _Op) -> None:
    (_tie if not _pad_value(op) else _pin)(tracer, op)


def _affine(tracer: _Tracer, op: _Op) -> None:
    """A convolution or linear map whose weight is no parameter (a site records itself): multilinear
    in input and weight, unless a bias pins it."""
    bias = op.kwargs.get("bias", op.args[2] if len(op.args) > 2 else None)
    (_pin if isinstance(bias, Tensor) else _multilinear)(tracer, op)


SCALE_RULES: dict[str, ScaleRule] = {}
for _names, _rule in [
    (
        "view reshape flatten unflatten permute transpose t T mT contiguous clone detach data squeeze unsqueeze "
        "expand repeat tile flip roll narrow select getitem split chunk unbind movedim pixel_shuffle pixel_unshuffle "
        "channel_shuffle unfold fold to float double half bfloat16 type cpu cuda cat stack hstack vstack dstack "
        "max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices "
        "avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d "
        "adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d adaptive_max_pool1d_with_indices "
        "adaptive_max_pool2d_with_indices adaptive_max_pool3d_with_indices lp_pool1d lp_pool2d max_unpool1d "
        "max_unpool2d max_unpool3d interpolate upsample upsample_nearest upsample_bilinear relu leaky_relu rrelu "
        "dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout abs neg positive maximum minimum "
        "copy fmax fmin sum mean nansum nanmean amax amin max min median norm std cumsum trace diagonal",
        _tie,
    ),
    ("prelu expand_as view_as reshape_as type_as", _tie_first),
    ("add sub rsub where setitem", _additive),
    ("mul", _product(+1.0)),
    ("div", _product(-1.0)),
    ("matmul mm bmm einsum outer inner dot kron", _multilinear),
    ("bilinear", _bilinear),
    ("pow", _power(None)),
    ("sqrt", _power(0.5)),
    ("rsqrt", _power(-0.5)),
    ("square", _power(2.0)),
    ("var", _power(2.0)),
    ("rdiv reciprocal", _reciprocal),
    ("clamp clamp_min", _clamp),
    ("pad constant_pad_nd", _pad),
    ("conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear", _affine),
]:
    for _name in _names.split():
        SCALE_RULES[_name] = _rule


@dataclass
class ScaleSolution:
    """Log-scales of every layer's input and output, and the rates they predict."""

    rho_in: dict[str, float]
    rho_out: dict[str, float]
    predicted_log_rate: dict[str, float]
    normalization_rho: dict[str, float] = field(default_factory=dict)  # input log-scale per normalization module
    approximated_rho: dict[str, float] = field(default_factory=dict)  # largest |input log-scale| per approximated op
    input_part_rho: dict[str, tuple[float, ...]] = field(default_factory=dict)  # per slice of a concatenated input

    def input_factors(self, layer: str) -> list[float] | None:
        """Factors of the weight's input-channel slices, ``exp(rho_out - rho_slice)`` (None: one factor)."""
        parts = self.input_part_rho.get(layer)
        return None if parts is None else [math.exp(self.rho_out[layer] - rho) for rho in parts]

    def damped(self, step: float) -> "ScaleSolution":
        """The same direction, ``step`` times as far (every constraint is linear: still function-keeping)."""
        return ScaleSolution(
            {k: step * v for k, v in self.rho_in.items()},
            {k: step * v for k, v in self.rho_out.items()},
            {k: v for k, v in self.predicted_log_rate.items()},
            {k: step * v for k, v in self.normalization_rho.items()},
            {k: step * v for k, v in self.approximated_rho.items()},
            {k: tuple(step * x for x in v) for k, v in self.input_part_rho.items()},
        )

    def weight_factor(self, layer: str) -> float:
        """Factor applied to the layer's weight, ``exp(rho_out - rho_in)``."""
        return math.exp(self.rho_out[layer] - self.rho_in[layer])

    def bias_factor(self, layer: str) -> float:
        """Factor applied to the layer's bias, ``exp(rho_out)``."""
        return math.exp(self.rho_out[layer])


@dataclass
class LayerGraph:
    """What one probe forward pass revealed about the model.

    Attributes (keyed by weight unit, see ``sites.WeightUnit``):
        calls: how many affine sites use each weight in one forward.
        sites: ``(input_node, output_node)`` of every site of every weight, in call order.
        has_bias: whether the weight's sites add a bias parameter.
        bias_parameters: qualified names of the bias parameters its sites add.
        layouts: each weight's filter layout and groups (from its first site).
        other_uses: operations other than affine sites that read the weight (e.g. an
            embedding lookup of a tied weight), with where they were called.
        called_modules: qualified names of the modules whose forward ran.
        normalizations: normalization modules whose input scale is free (compensated by their
            ``eps`` and running statistics), by qualified name.
        approximated: operations tied because they were homogeneous on the data within the
            tolerance (only with a ``HomogeneityTest``), with their largest deviation.
        input_parts: weights whose (only) site reads a concatenation, through slice-wise
            operations: each slice of its input, and the matching input channels of the
            weight, may take a scale of its own.
    """

    calls: dict[str, int]
    sites: dict[str, list[tuple[int, int]]]
    has_bias: dict[str, bool]
    bias_parameters: dict[str, list[str]]
    layouts: dict[str, Layout]
    other_uses: dict[str, list[str]]
    called_modules: set[str]
    groups: ScaleGroups = field(repr=False)
    equations: list[dict[int, float]] = field(repr=False)
    normalizations: dict[str, Normalization] = field(default_factory=dict)
    approximated: dict[str, float] = field(default_factory=dict)
    approximated_inputs: list[tuple[str, int]] = field(default_factory=list, repr=False)
    input_parts: dict[str, Concatenation] = field(default_factory=dict)

    def pinned_by(self, layer: str) -> tuple[str | None, str | None]:
        """Why the layer's input and output scales are fixed (None where free)."""
        input_node, output_node = self.sites[layer][0]
        return self.groups.reason(input_node), self.groups.reason(output_node)

    def _system(self, layers: list[str], fixed: frozenset[str]) -> "_ScaleSystem":
        """The scale variables left free, the constraints on them, and each layer's log-rate change."""
        groups = self.groups.copy()
        equations = list(self.equations)
        for layer in fixed:
            parts = self.input_parts[layer].parts if layer in self.input_parts else ()
            for input_node, output_node in self.sites.get(layer, []):
                groups.tie([input_node, output_node, *parts])
                if self.has_bias[layer]:
                    groups.pin(output_node, "fixed layer")
        for layer, sites in self.sites.items():
            first_in, first_out = sites[0]
            for input_node, output_node in sites[1:]:
                if self.has_bias[layer]:
                    groups.tie([first_out, output_node])
                    groups.tie([first_in, input_node])
                else:
                    equations.append({output_node: 1.0, input_node: -1.0, first_out: -1.0, first_in: 1.0})
        system = _ScaleSystem(groups)
        equation_rows = [system.row(equation.items()) for equation in equations]
        objective_rows = [system.row(self._rate_change(layer, fixed)) for layer in layers]
        n_vars = len(system.columns)
        if n_vars and layers:
            system.null_space = _null_space(_dense(equation_rows, n_vars))
            centre = torch.eye(len(layers), dtype=torch.float64) - 1.0 / len(layers)
            system.reduced = centre @ _dense(objective_rows, n_vars) @ system.null_space
            system.centre = centre
        return system

    def can_change_rates(self, layers: Iterable[str], fixed: Iterable[str] = ()) -> bool:
        """Whether any function-keeping rescaling changes the rates of ``layers`` relative to each other."""
        system = self._system([layer for layer in layers if layer in self.sites], frozenset(fixed))
        return system.reduced is not None and bool((system.reduced.abs() > 1e-9).any())

    def _rate_change(self, layer: str, fixed: frozenset[str]) -> list[tuple[int, float]]:
        """``d log C / d rho`` per node at no change (slices of a concatenated input: equal shares)."""
        input_node, output_node = self.sites[layer][0]
        if layer not in self.input_parts or layer in fixed:
            return [(input_node, 2.0), (output_node, -2.0)]
        parts = self.input_parts[layer].parts
        return [(part, 2.0 / len(parts)) for part in parts] + [(output_node, -2.0)]

    def solve(
        self,
        log_rates: dict[str, float],
        fixed: Iterable[str] = (),
        slice_shares: dict[str, tuple[list[float], list[float]]] | None = None,
    ) -> ScaleSolution:
        """Scales that make ``log_rates`` as equal as the graph allows, keeping the function.

        Minimizes the spread of the rates after rescaling over the layers in
        ``log_rates`` (least squares in the log-rates); layers in ``fixed`` keep
        their weights and biases as they are. Among the best solutions it takes
        the one with the smallest scale changes. A layer's log-rate changes by
        ``2 (rho_in - rho_out)``; where its input is a concatenation whose
        slices are scaled apart, by ``log(sum_j g_j e^{2(rho_j - rho_out)}) / 2 -
        log(sum_j a_j e^{2(rho_out - rho_j)}) / 2``, with ``g_j`` and ``a_j`` the
        slices' shares of the squared gradient and weight norms
        (``slice_shares``; equal shares where not given). That is exact, not
        linear: it is solved by Gauss-Newton steps from no change (one step
        when no such layer takes part).
        """
        fixed = frozenset(fixed)
        layers = [layer for layer in log_rates if layer in self.sites]
        system = self._system(layers, fixed)
        rho = torch.zeros(len(system.columns), dtype=torch.float64)
        sliced = [layer for layer in layers if layer in self.input_parts and layer not in fixed]
        shares = {layer: _shares(self.input_parts[layer], (slice_shares or {}).get(layer)) for layer in sliced}
        if system.reduced is not None and system.reduced.numel():
            assert system.null_space is not None and system.centre is not None
            rates = torch.tensor([log_rates[layer] for layer in layers], dtype=torch.float64)
            z = torch.zeros(system.null_space.shape[1], dtype=torch.float64)
            for _ in range(GAUSS_NEWTON_STEPS if sliced else 1):
                values, jacobian = self._log_rates_after(layers, rates, system.null_space @ z, system, shares)
                step = -torch.linalg.pinv(system.centre @ jacobian @ system.null_space, rtol=1e-10) @ (
                    system.centre @ values)
                z = z + step
                if not step.numel() or float(step.abs().max()) < 1e-12:
                    break
            rho = system.null_space @ z

        def value(index: int) -> float:
            column = system.column(index)  # a free group in no row keeps rho = 0 (minimum norm)
            return 0.0 if column is None else float(rho[column])

        rho_in = {layer: value(sites[0][0]) for layer, sites in self.sites.items()}
        rho_out = {layer: value(sites[0][1]) for layer, sites in self.sites.items()}
        input_part_rho = {layer: tuple(value(part) for part in self.input_parts[layer].parts) for layer in sliced}
        predicted_values, _ = self._log_rates_after(
            layers, torch.tensor([log_rates[layer] for layer in layers], dtype=torch.float64), rho, system, shares)
        predicted = dict(zip(layers, predicted_values.tolist()))
        normalization_rho = {name: value(norm.input_node) for name, norm in self.normalizations.items()}
        approximated_rho: dict[str, float] = {}  # the largest change of an input of each such operation
        for op, node in self.approximated_inputs:
            approximated_rho[op] = max(abs(value(node)), approximated_rho.get(op, 0.0))
        return ScaleSolution(rho_in, rho_out, predicted, normalization_rho, approximated_rho, input_part_rho)

    def _log_rates_after(
        self,
        layers: list[str],
        log_rates: Tensor,
        rho: Tensor,
        system: "_ScaleSystem",
        shares: dict[str, tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, Tensor]:
        """The log-rates after the scales ``rho`` (one per free variable), and their Jacobian."""
        values = log_rates.clone()
        jacobian = torch.zeros(len(layers), len(rho), dtype=torch.float64)

        def at(node: int) -> tuple[float, int | None]:
            column = system.column(node)
            return (0.0 if column is None else float(rho[column])), column

        for row, layer in enumerate(layers):
            input_node, output_node = self.sites[layer][0]
            out_value, out_column = at(output_node)
            if layer not in shares:
                in_value, in_column = at(input_node)
                values[row] += 2.0 * (in_value - out_value)
                coefficients = [(in_column, 2.0), (out_column, -2.0)]
            else:
                gradient_share, weight_share = shares[layer]
                located = [at(part) for part in self.input_parts[layer].parts]
                part_values = torch.tensor([v for v, _ in located], dtype=torch.float64)
                gradient_terms = gradient_share * torch.exp(2.0 * (part_values - out_value))
                weight_terms = weight_share * torch.exp(2.0 * (out_value - part_values))
                values[row] += 0.5 * (torch.log(gradient_terms.sum()) - torch.log(weight_terms.sum()))
                d_parts = gradient_terms / gradient_terms.sum() + weight_terms / weight_terms.sum()
                coefficients = [(column, float(d)) for (_, column), d in zip(located, d_parts)]
                coefficients.append((out_column, -2.0))
            for column, coefficient in coefficients:
                if column is not None:
                    jacobian[row, column] += coefficient
        return values, jacobian


GAUSS_NEWTON_STEPS = 30


def _shares(concatenation: Concatenation, given: tuple[list[float], list[float]] | None) -> tuple[Tensor, Tensor]:
    """Normalized gradient and weight shares of a concatenated input's slices (equal where unknown
    or degenerate)."""
    equal = torch.full((len(concatenation.parts),), 1.0 / len(concatenation.parts), dtype=torch.float64)
    if given is None:
        return equal, equal
    result = []
    for values in given:
        tensor = torch.tensor(values, dtype=torch.float64)
        total = float(tensor.sum())
        usable = total > 0 and math.isfinite(total) and bool((tensor >= 0).all())
        result.append(tensor / total if usable else equal)
    return result[0], result[1]


@dataclass
class _ScaleSystem:
    """The free scale groups of a graph as variables (columns), with the constraints' null space."""

    groups: ScaleGroups
    columns: dict[int, int] = field(default_factory=dict)  # free group root -> variable index
    null_space: Tensor | None = None
    reduced: Tensor | None = None  # centred objective rows on the null space
    centre: Tensor | None = None

    def column(self, node: int) -> int | None:
        """The variable of ``node``'s group, None if pinned or in no row."""
        if self.groups.reason(node) is not None:
            return None
        return self.columns.get(self.groups.find(node))

    def row(self, node_coefficients: Iterable[tuple[int, float]]) -> dict[int, float]:
        """A linear form over nodes as one over the free variables (new ones numbered as met)."""
        entries: dict[int, float] = {}
        for node, coefficient in node_coefficients:
            if self.groups.reason(node) is None:
                column = self.columns.setdefault(self.groups.find(node), len(self.columns))
                entries[column] = entries.get(column, 0.0) + coefficient
        return entries


def _dense(rows: list[dict[int, float]], n_vars: int) -> Tensor:
    """Sparse rows (column -> coefficient) as a float64 matrix."""
    matrix = torch.zeros(len(rows), n_vars, dtype=torch.float64)
    for i, entries in enumerate(rows):
        for column, coefficient in entries.items():
            matrix[i, column] = coefficient
    return matrix


def _null_space(matrix: Tensor) -> Tensor:
    """Orthonormal basis (columns) of the null space of ``matrix``."""
    n_vars = matrix.shape[1]
    if matrix.shape[0] == 0:
        return torch.eye(n_vars, dtype=matrix.dtype)
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=True)
    rank = int((singular > 1e-10 * max(float(singular.max()), 1.0)).sum())
    return vh[rank:].T


def trace_graph(
    model: nn.Module,
    batch: Batch,
    forward: ForwardFn,
    units: UnitIndex,
    homogeneity: HomogeneityTest | None = None,
    agree: Callable[[list[float]], list[float]] | None = None,
) -> LayerGraph:
    """Run ``forward(model, batch)`` once under a tracing mode and record the sites and scale relations.

    The caller provides grad mode and eval mode; nothing in the model changes.
    Parametrized weights are computed once for the pass (``parametrize.cached``),
    so that their sites are recognized. With ``homogeneity``, operations that
    would be pinned are measured on ``batch`` and tied where they pass it;
    ``agree`` turns this process's deviations into those all processes use.
    """
    name_of = {module: name for name, module in model.named_modules()}
    tracer = _Tracer(units, {name: module for module, name in name_of.items()}, homogeneity)

    def enter(module: nn.Module, args: Any) -> None:
        tracer.scope.append(name_of.get(module, "?"))
        tracer.called_modules.add(tracer.scope[-1])

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if tracer.scope:
            tracer.scope.pop()

    with temporary_hooks() as hooks, parametrize.cached():
        for module in name_of:
            hooks.before(module, enter)
            hooks.after(module, leave)
        for tensor in floating_tensors(batch):
            tracer.node(tensor, reason_if_new="model input")
        with tracer:
            output = forward(model, batch)
        for tensor in floating_tensors(output):
            tracer._collapse(tensor)
            tracer.groups.pin(tracer.node(tensor), "model output")
    input_parts = {}
    for unit, concatenations in tracer.sliced_sites.items():
        if len(concatenations) == 1 and len(tracer.sites[unit]) == 1:
            input_parts[unit] = concatenations[0][1]
        else:  # a weight used at several sites keeps one input scale
            for input_node, concatenation in concatenations:
                tracer.groups.tie([input_node, *concatenation.parts])
    if homogeneity is not None:
        deviations = [deviation for _, deviation, _ in tracer.candidates]
        tracer.decide_homogeneity(agree(deviations) if agree is not None else deviations)
    return LayerGraph(
        calls={unit: len(sites) for unit, sites in tracer.sites.items()},
        sites=tracer.sites,
        has_bias={unit: unit in tracer.bias_parameters for unit in tracer.sites},
        bias_parameters=tracer.bias_parameters,
        layouts=tracer.layouts,
        other_uses=tracer.other_uses,
        called_modules=tracer.called_modules,
        groups=tracer.groups,
        equations=tracer.equations,
        normalizations=tracer.normalizations,
        approximated=tracer.approximated,
        approximated_inputs=tracer.approximated_inputs,
        input_parts=input_parts,
    )
