"""The layer graph and the scale freedom it leaves (the constraints of Part 2).

Every floating tensor computed in a forward pass gets a log-scale ``rho``
(docs/method.md, Part 2). Scaling affine layer k's weight by
``exp(rho_out - rho_in)`` and its bias by ``exp(rho_out)`` keeps the network's
function exactly if every other operation's scales agree:

- homogeneous operations of degree 1 (ReLU, pooling, reshapes, sums, concatenations, ...)
  *tie* their floating inputs and outputs to one scale;
- products add scales (``rho_out = rho_a + rho_b``), powers multiply them;
- a comparison ties what it compares (so a comparison with zero leaves the scale
  free), and a comparison with a non-zero number pins it (``h * (h > t)``,
  ``torch.where(h > t, h, 0)``, score thresholds); indices chosen by order
  (argmax, argsort, NMS) leave it free;
- a normalization module (batch, layer, group, instance or RMS norm) leaves
  the scale of its input *free* and fixes that of its output: scaling its input
  by ``r`` keeps its output when its ``eps`` is scaled by ``r**2`` and its running
  mean and variance by ``r`` and ``r**2`` (``operations.NormalizationSpec``; the
  compensation is part of applying the scales);
- everything else (sigmoid, tanh, GELU, an added constant, an operation this
  module does not know) *pins* its inputs and outputs to ``rho = 0``, as do the
  model's inputs, its outputs and all constants. Optionally (``scale_mode=
  "approximate"``) an operation without a rule here and with one varying input
  is *tied* instead when it behaves homogeneously on the data
  (``operations.HomogeneityTest``); the conditional pins of the rules (an added
  constant, ``clamp(max=)``, padding with a value) stay pins;
- a concatenation's slices keep scales of their own while only slice-wise
  operations and one affine site read it (``Concatenation``).

These relations are recorded by a probe forward pass under a
``TorchFunctionMode`` (so arbitrary ``forward`` code works, with no tracing
restrictions), then reduced with union-find to a few linear equations. What each
operation does is its entry in ``operations.OPERATIONS``; the least-squares
problem on the result is ``solve``'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .adapters import CONV, LINEAR, Layout
from .inputs import Batch, ForwardFn, floating_tensors
from .operations import (
    OPERATIONS,
    HomogeneityTest,
    Normalization,
    NormalizationSpec,
    Op,
    OperationSpec,
    call_argument,
)
from .safety import temporary_hooks
from .sites import CallInterceptor, SiteCall, UnitIndex, op_name
from .torch_internals import view_base

_UNKNOWN = OperationSpec()  # an operation without an entry: pinned (or measured, in approximate mode)


class ScaleGroups:
    """Union-find over tensor nodes: tied nodes share one scale; a pinned group has ``rho = 0``; other
    relations (products, powers) are linear ``equations`` in the nodes' scales. What the scale rules of
    ``operations.OPERATIONS`` record into (``operations.ScaleRelations``)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pins: dict[int, list[tuple[int, str]]] = {}  # keyed by group root: each pinned node and why, in order
        self.equations: list[dict[int, float]] = []
        self.empty: set[int] = set()  # nodes of 0-element tensors: no scale of theirs can matter, nothing pins them

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
                if other in self.pins:
                    self.pins.setdefault(root, []).extend(self.pins.pop(other))

    def pin(self, node: int, reason: str) -> None:
        """Fix ``node``'s group at ``rho = 0``, for ``reason`` (every reason is kept, with its node); a
        0-element tensor's node (``empty``: an empty cache, a placeholder) fixes nothing."""
        if node not in self.empty:
            self.pins.setdefault(self.find(node), []).append((node, reason))

    def equation(self, coefficients: dict[int, float]) -> None:
        """Require ``sum(coefficient * rho[node]) == 0``."""
        self.equations.append(coefficients)

    def reason(self, node: int) -> str | None:
        """Why ``node``'s group is pinned (the first reason given), or None if it is free."""
        pins = self.pins.get(self.find(node))
        return pins[0][1] if pins else None

    def nearest_reason(self, node: int) -> str | None:
        """Why ``node``'s group is pinned, told by the pin nearest ``node`` in the order of the trace (the
        operation next to a layer, not one across the network the group reaches through residual sums),
        or None if it is free."""
        pins = self.pins.get(self.find(node))
        return min(pins, key=lambda pin: abs(pin[0] - node))[1] if pins else None

    def copy(self) -> ScaleGroups:
        """An independent copy."""
        other = ScaleGroups()
        other.parent, other.equations, other.empty = list(self.parent), list(self.equations), set(self.empty)
        other.pins = {root: list(pins) for root, pins in self.pins.items()}
        return other


class _Tracer(CallInterceptor):
    """Records scale relations between the tensors of one forward pass, and the affine sites."""

    def __init__(
        self,
        index: UnitIndex,
        modules: dict[str, nn.Module],
        homogeneity: HomogeneityTest | None = None,
        across_normalization: bool = False,
    ) -> None:
        super().__init__(index)
        self.modules = modules
        self.homogeneity = homogeneity
        self.across_normalization = across_normalization
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
        self.sites: dict[str, list[tuple[int, int]]] = {}
        self.layouts: dict[str, Layout] = {}
        self.bias_parameters: dict[str, list[str]] = {}
        self.other_uses: dict[str, list[str]] = {}
        self.scope: list[str] = []
        self.called_modules: set[str] = set()

    def node(self, tensor: Tensor, reason_if_new: str | None = None) -> int:
        """The node of ``tensor``; a tensor seen first as an input is pinned with ``reason_if_new``
        (None: a constant, named with the module the present call is made in; "": not pinned, an
        operation's output). A 0-element tensor pins nothing (``ScaleGroups.empty``)."""
        key = id(tensor)
        if key not in self.node_of:
            self.node_of[key] = self.groups.add()
            self.alive.append(tensor)
            if tensor.numel() == 0:
                self.groups.empty.add(self.node_of[key])
            if reason_if_new is None:
                reason_if_new = f"a constant (parameter, buffer or literal){self.where()}"
            if reason_if_new:
                self.groups.pin(self.node_of[key], reason_if_new)
            else:
                self.produced.add(key)
        return self.node_of[key]

    def where(self) -> str:
        """Where the present call is made, for a pin's reason: `` in 'module'``, `` in the model's own
        forward`` (the root module's), or empty."""
        return describe_scope(self.scope)

    def on_call(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], site: SiteCall | None
    ) -> Any:
        name = op_name(func)
        known = OPERATIONS.get(name)
        spec = known or _UNKNOWN
        deviation = None
        if self.homogeneity is not None and site is None and known is None:
            varying = [t for t in floating_tensors((args, kwargs)) if id(t) in self.produced]
            if len(varying) == 1 and "out" not in kwargs:  # measured before the call: it may work in place
                deviation = self.homogeneity.deviation(func, args, kwargs, varying[0])
                deviation = math.inf if deviation is None else deviation
        out = func(*args, **kwargs)
        outputs = list(floating_tensors(out))
        if not outputs and spec.without_floating_output is None:
            return out  # sizes, shapes: no floating data flows on (comparisons have an entry)
        inputs = list(floating_tensors((args, kwargs)))
        in_nodes = [self.node(t) for t in inputs]
        out_nodes = [self.node(t, reason_if_new="") for t in outputs]
        op = Op(name, spec, args, kwargs, inputs, in_nodes, out_nodes, self.where())
        if site is not None and outputs:
            self._site(site, outputs[0])
            self._note_uses(name, [site.input] if isinstance(site.input, Tensor) else [], outputs)
            return out
        self._note_uses(name, inputs, outputs)
        if spec.concatenation and outputs and self._concatenate(op, outputs[0]):
            return out
        if any(id(t) in self.concatenations for t in inputs) and self._keeps_slices(op, inputs, outputs):
            return out
        if spec.normalization is not None and outputs:
            self._normalization(op, spec.normalization)
        elif deviation is not None and outputs:  # tied or pinned once every process's measurement is in
            varying_nodes = [n for t, n in zip(inputs, in_nodes) if id(t) in self.produced]
            self.candidates.append((f"{name}{op.where}", deviation, varying_nodes + out_nodes))
        else:
            rule = spec.rule if outputs else spec.without_floating_output
            assert rule is not None
            rule(self.groups, op)
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

    def _concatenate(self, op: Op, output: Tensor) -> bool:
        """Record a concatenation of several floating tensors as slices with scales of their own."""
        tensors = call_argument(op.args, op.kwargs, (0, "tensors"))
        dim = call_argument(op.args, op.kwargs, (1, "dim"), op.kwargs.get("axis", 0))
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
                    self.collapse(tensor)
                parts.append(self.node(tensor))
                sizes.append(tensor.shape[dim])
        self.concatenations[id(output)] = Concatenation(dim, tuple(parts), tuple(sizes))
        return True

    def _keeps_slices(self, op: Op, inputs: list[Tensor], outputs: list[Tensor]) -> bool:
        """Pass a concatenation's slices through an operation that treats every slice alike and is
        homogeneous in each; otherwise give every concatenation among ``inputs`` one scale."""
        concatenated = [t for t in inputs if id(t) in self.concatenations]
        source = concatenated[0]
        concatenation = self.concatenations[id(source)]
        varying = [t for t in inputs if id(t) in self.produced]
        output = outputs[0] if len(outputs) == 1 else None
        kept = (
            len(varying) == 1
            and varying[0] is source
            and output is not None
            and output.dim() == source.dim()
            and output.shape[concatenation.dim] == source.shape[concatenation.dim]
            and (
                (op.spec.slice_wise and output.shape == source.shape)
                or (op.spec.channel_wise and concatenation.dim == 1 and source.dim() >= 3)
            )
            and not op.fill_value()
        )
        if kept:
            assert output is not None
            self.concatenations[id(output)] = concatenation
            return True
        for tensor in concatenated:
            self.collapse(tensor)
        return False

    def collapse(self, tensor: Tensor) -> None:
        """Give a concatenation one scale: its slices and the whole are tied."""
        concatenation = self.concatenations.pop(id(tensor), None)
        if concatenation is not None:
            self.groups.tie([self.node(tensor), *concatenation.parts])

    def _normalization(self, op: Op, spec: NormalizationSpec) -> None:
        """A normalization: its output's scale is its own; its input's is free if rescaling across
        normalizations was asked for and its module can compensate."""
        where = op.where
        for n in op.out_nodes:
            self.groups.pin(n, f"{op.name}{where}")
        data = call_argument(op.args, op.kwargs, (0, "input"))
        if not isinstance(data, Tensor):
            return
        data_node = self.node(data)
        if not self.across_normalization:
            self.groups.pin(data_node, f"{op.name}{where} (across_normalization=False)")
            return
        module_name = self.scope[-1] if self.scope else None
        module = self.modules.get(module_name) if module_name is not None else None
        reason = spec.compensation_problem(module, op.args, op.kwargs)
        if reason is not None:
            self.groups.pin(data_node, f"{op.name}{where} ({reason})")
            return
        assert module_name is not None
        known = self.normalizations.get(module_name)
        if known is None:
            assert module is not None
            self.normalizations[module_name] = spec.compensated(data_node, module, op.args, op.kwargs)
        else:  # one eps for every call of the module: one scale
            self.groups.tie([known.input_node, data_node])

    def _site(self, site: SiteCall, output: Tensor) -> None:
        """Record one call of an affine site: its input and output nodes, its bias and its layout."""
        unit = site.unit.name
        concatenation = self.concatenations.get(id(site.input))
        if concatenation is not None:
            adapter, groups = site.layout
            weight = site.weight
            sliceable = (
                not site.through_view
                and site.unit.kind in ("parameter", "weight_norm", "prune")
                and isinstance(weight, Tensor)
                and sum(concatenation.sizes) == weight.shape[1]
                and (
                    (adapter is CONV and groups == 1 and concatenation.dim == 1 and site.input.dim() == weight.dim())
                    or (adapter is LINEAR and concatenation.dim == site.input.dim() - 1)
                )
            )
            if not sliceable:
                self.collapse(site.input)
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
            base = view_base(tensor)
            root = tensor if base is None else base
            if outputs and all(out is tensor or view_base(out) is root for out in outputs):
                continue  # the weight itself (a no-op .to, .contiguous) or a view of it: its uses are what count
            self.other_uses.setdefault(unit.name, []).append(f"{name}{self.where()}")


@dataclass(frozen=True)
class Concatenation:
    """A tensor concatenated from parts along ``dim``, each part with a scale of its own (or what
    slice-wise operations made of it): the node and size of every part."""

    dim: int
    parts: tuple[int, ...]
    sizes: tuple[int, ...]


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
        """Why the layer's input and output scales are fixed (None where free; for a concatenated
        input, the slices' reasons where every slice is fixed)."""
        input_node, output_node = self.sites[layer][0]
        input_reason = self.groups.nearest_reason(input_node)
        if layer in self.input_parts:
            reasons = [self.groups.nearest_reason(part) for part in self.input_parts[layer].parts]
            input_reason = None if None in reasons else "; ".join(dict.fromkeys(r for r in reasons if r))
        return input_reason, self.groups.nearest_reason(output_node)

    def has_free_slices(self, layer: str) -> bool:
        """Whether some slice of the layer's concatenated input has a free scale."""
        parts = self.input_parts[layer].parts if layer in self.input_parts else ()
        return any(self.groups.reason(part) is None for part in parts)


@dataclass
class ModuleScope:
    """Which modules are running: ``stack`` holds the qualified names of those whose forward is running,
    innermost last (the root module's name is empty); ``called``, of every one that ran."""

    stack: list[str] = field(default_factory=list)
    called: set[str] = field(default_factory=set)


def describe_scope(stack: list[str]) -> str:
    """Where a call made inside the modules ``stack`` (innermost last) is made, for a message:
    `` in 'module'``, `` in the model's own forward`` (the root module's), or empty (outside any)."""
    if not stack:
        return ""
    return f" in '{stack[-1]}'" if stack[-1] else " in the model's own forward"


@contextmanager
def module_scope(model: nn.Module) -> Iterator[ModuleScope]:
    """A ``ModuleScope`` of ``model`` kept current through the block by temporary forward hooks."""
    name_of = {module: name for name, module in model.named_modules()}
    scope = ModuleScope()

    def enter(module: nn.Module, args: Any) -> None:
        scope.stack.append(name_of.get(module, "?"))
        scope.called.add(scope.stack[-1])

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if scope.stack:
            scope.stack.pop()

    with temporary_hooks() as hooks:
        for module in name_of:
            hooks.before(module, enter)
            hooks.after(module, leave)
        yield scope


def trace_graph(
    model: nn.Module,
    batch: Batch,
    forward: ForwardFn,
    units: UnitIndex,
    homogeneity: HomogeneityTest | None = None,
    agree: Callable[[list[float]], list[float]] | None = None,
    *,
    across_normalization: bool = False,
) -> LayerGraph:
    """Run ``forward(model, batch)`` once under a tracing mode and record the sites and scale relations.

    The caller provides grad mode and eval mode; nothing in the model changes.
    Parametrized weights are computed once for the pass (``parametrize.cached``),
    so that their sites are recognized. With ``homogeneity``, operations that
    would be pinned are measured on ``batch`` and tied where they pass it;
    ``agree`` turns this process's deviations into those all processes use.
    ``across_normalization``: a normalization layer's input scale is free where its
    module can compensate (else every normalization pins it).
    """
    modules = dict(model.named_modules())
    tracer = _Tracer(units, modules, homogeneity, across_normalization)
    with module_scope(model) as scope, parametrize.cached():
        tracer.scope, tracer.called_modules = scope.stack, scope.called
        for tensor in floating_tensors(batch):
            tracer.node(tensor, reason_if_new="model input")
        with tracer:
            output = forward(model, batch)
        for tensor in floating_tensors(output):
            tracer.collapse(tensor)
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
        equations=tracer.groups.equations,
        normalizations=tracer.normalizations,
        approximated=tracer.approximated,
        approximated_inputs=tracer.approximated_inputs,
        input_parts=input_parts,
    )
