"""Part 2's least-squares problem: the scales that make the change rates as equal as the graph allows.

The variables are the free scale groups of a ``graph.LayerGraph``; the
constraints (products, powers, shared layers, fixed layers) restrict them to a
null space; the objective is the spread of the log-rates after rescaling. See
docs/method.md, "The least-squares problem" and "Concatenations".
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .graph import Concatenation, LayerGraph, ScaleGroups


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

    def damped(self, step: float) -> ScaleSolution:
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


def _system(graph: LayerGraph, layers: list[str], fixed: frozenset[str]) -> _ScaleSystem:
    """The scale variables left free, the constraints on them, and each layer's log-rate change."""
    groups = graph.groups.copy()
    equations = list(graph.equations)
    for layer in fixed:
        parts = graph.input_parts[layer].parts if layer in graph.input_parts else ()
        for input_node, output_node in graph.sites.get(layer, []):
            groups.tie([input_node, output_node, *parts])
            if graph.has_bias[layer]:
                groups.pin(output_node, "fixed layer")
    for layer, sites in graph.sites.items():
        first_in, first_out = sites[0]
        for input_node, output_node in sites[1:]:
            if graph.has_bias[layer]:
                groups.tie([first_out, output_node])
                groups.tie([first_in, input_node])
            else:
                equations.append({output_node: 1.0, input_node: -1.0, first_out: -1.0, first_in: 1.0})
    system = _ScaleSystem(groups)
    equation_rows = [system.row(equation.items()) for equation in equations]
    objective_rows = [system.row(_rate_change(graph, layer, fixed)) for layer in layers]
    n_vars = len(system.columns)
    if n_vars and layers:
        system.null_space = _null_space(_dense(equation_rows, n_vars))
        centre = torch.eye(len(layers), dtype=torch.float64) - 1.0 / len(layers)
        system.reduced = centre @ _dense(objective_rows, n_vars) @ system.null_space
        system.centre = centre
    return system


def can_change_rates(graph: LayerGraph, layers: Iterable[str], fixed: Iterable[str] = ()) -> bool:
    """Whether any function-keeping rescaling changes the rates of ``layers`` relative to each other."""
    system = _system(graph, [layer for layer in layers if layer in graph.sites], frozenset(fixed))
    return system.reduced is not None and bool((system.reduced.abs() > 1e-9).any())


def _rate_change(graph: LayerGraph, layer: str, fixed: frozenset[str]) -> list[tuple[int, float]]:
    """``d log C / d rho`` per node at no change (slices of a concatenated input: equal shares)."""
    input_node, output_node = graph.sites[layer][0]
    if layer not in graph.input_parts or layer in fixed:
        return [(input_node, 2.0), (output_node, -2.0)]
    parts = graph.input_parts[layer].parts
    return [(part, 2.0 / len(parts)) for part in parts] + [(output_node, -2.0)]


def solve_scales(
    graph: LayerGraph,
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
    layers = [layer for layer in log_rates if layer in graph.sites]
    system = _system(graph, layers, fixed)
    rho = torch.zeros(len(system.columns), dtype=torch.float64)
    sliced = [layer for layer in layers if layer in graph.input_parts and layer not in fixed]
    shares = {layer: _shares(graph.input_parts[layer], (slice_shares or {}).get(layer)) for layer in sliced}
    if system.reduced is not None and system.reduced.numel():
        assert system.null_space is not None and system.centre is not None
        rates = torch.tensor([log_rates[layer] for layer in layers], dtype=torch.float64)
        z = torch.zeros(system.null_space.shape[1], dtype=torch.float64)
        for _ in range(GAUSS_NEWTON_STEPS if sliced else 1):
            values, jacobian = _log_rates_after(graph, layers, rates, system.null_space @ z, system, shares)
            step = -torch.linalg.pinv(system.centre @ jacobian @ system.null_space, rtol=1e-10) @ (
                system.centre @ values
            )
            z = z + step
            if not step.numel() or float(step.abs().max()) < 1e-12:
                break
        rho = system.null_space @ z

    def value(index: int) -> float:
        column = system.column(index)  # a free group in no row keeps rho = 0 (minimum norm)
        return 0.0 if column is None else float(rho[column])

    rho_in = {layer: value(sites[0][0]) for layer, sites in graph.sites.items()}
    rho_out = {layer: value(sites[0][1]) for layer, sites in graph.sites.items()}
    input_part_rho = {  # every consumer of slices, in the objective or not: its slices moved for the others
        layer: tuple(value(part) for part in concatenation.parts)
        for layer, concatenation in graph.input_parts.items()
        if layer not in fixed
    }
    predicted_values, _ = _log_rates_after(
        graph, layers, torch.tensor([log_rates[layer] for layer in layers], dtype=torch.float64), rho, system, shares
    )
    predicted = dict(zip(layers, predicted_values.tolist()))
    normalization_rho = {name: value(norm.input_node) for name, norm in graph.normalizations.items()}
    approximated_rho: dict[str, float] = {}  # the largest change of an input of each such operation
    for op, node in graph.approximated_inputs:
        approximated_rho[op] = max(abs(value(node)), approximated_rho.get(op, 0.0))
    return ScaleSolution(rho_in, rho_out, predicted, normalization_rho, approximated_rho, input_part_rho)


def _log_rates_after(
    graph: LayerGraph,
    layers: list[str],
    log_rates: Tensor,
    rho: Tensor,
    system: _ScaleSystem,
    shares: dict[str, tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """The log-rates after the scales ``rho`` (one per free variable), and their Jacobian."""
    values = log_rates.clone()
    jacobian = torch.zeros(len(layers), len(rho), dtype=torch.float64)

    def at(node: int) -> tuple[float, int | None]:
        column = system.column(node)
        return (0.0 if column is None else float(rho[column])), column

    for row, layer in enumerate(layers):
        input_node, output_node = graph.sites[layer][0]
        out_value, out_column = at(output_node)
        if layer not in shares:
            in_value, in_column = at(input_node)
            values[row] += 2.0 * (in_value - out_value)
            coefficients = [(in_column, 2.0), (out_column, -2.0)]
        else:
            located = [at(part) for part in graph.input_parts[layer].parts]
            part_values = torch.tensor([v for v, _ in located], dtype=torch.float64)
            change, d_parts = _sliced_change(part_values, out_value, shares[layer])
            values[row] += change
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


def _sliced_change(part_values: Tensor, out_value: float, shares: tuple[Tensor, Tensor]) -> tuple[float, Tensor]:
    """The log-rate change of a layer whose input slices move by the log-scales ``part_values`` and its output
    by ``out_value`` (``solve_scales``' slice formula, from the slices' gradient and weight ``shares``), and
    its derivative in each slice's log-scale."""
    gradient_share, weight_share = shares
    gradient_terms = gradient_share * torch.exp(2.0 * (part_values - out_value))
    weight_terms = weight_share * torch.exp(2.0 * (out_value - part_values))
    change = 0.5 * float(torch.log(gradient_terms.sum()) - torch.log(weight_terms.sum()))
    return change, gradient_terms / gradient_terms.sum() + weight_terms / weight_terms.sum()


def log_rates_after(
    graph: LayerGraph,
    log_rates: dict[str, float],
    solution: ScaleSolution,
    fixed: Iterable[str] = (),
    slice_shares: dict[str, tuple[list[float], list[float]]] | None = None,
) -> dict[str, float]:
    """The log-rates of the layers of ``log_rates`` once ``solution`` is applied, by the relations
    ``solve_scales`` solves with (the same ``fixed`` and ``slice_shares``): for a solve's own solution its
    ``predicted_log_rate``, and for a damped one (``ScaleSolution.damped``) what that shorter step gives,
    which is not a fraction of the full step's change where a layer's input slices move apart."""
    fixed = frozenset(fixed)
    after = {}
    for layer, value in log_rates.items():
        if layer not in graph.sites:
            continue
        out_value = solution.rho_out[layer]
        if layer in graph.input_parts and layer not in fixed:
            shares = _shares(graph.input_parts[layer], (slice_shares or {}).get(layer))
            parts = torch.tensor(solution.input_part_rho[layer], dtype=torch.float64)
            after[layer] = value + _sliced_change(parts, out_value, shares)[0]
        else:
            after[layer] = value + 2.0 * (solution.rho_in[layer] - out_value)
    return after
