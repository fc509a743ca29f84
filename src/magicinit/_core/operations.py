"""What Part 2 knows of each operation: how it relates the scales of its inputs and outputs.

Every operation a forward pass calls is looked up by its canonical name
(``sites.op_name``) in ``OPERATIONS``: one ``OperationSpec`` per name, which
says everything Part 2 knows of it (its scale rule, whether a concatenation's
slices pass through it, whether it is a concatenation, a normalization, a write
or a value read into Python). Adding an operation is one entry there; an
operation without one pins its inputs and outputs (or, with
``scale_mode="approximate"``, is measured: ``HomogeneityTest``).

- Normalizations (batch, layer, group, instance, RMS norm) give the same output
  for an input scaled by ``r`` once their ``eps`` is scaled by ``r**2`` and their
  running statistics by ``r`` and ``r**2``. They are declared by keyword names
  (``NormalizationSpec``: the function's arguments, the calling module's
  attribute and buffers); ``compensate_normalization`` makes the change and
  ``NormalizationConstants`` keeps what it changes to put it back.
- Any other operation can be measured on the data it meets for how far it is
  from homogeneous (``HomogeneityTest``; ``scale_mode="approximate"``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .inputs import floating_tensors

Slot = tuple[int, str]  # an argument's position and keyword


def call_argument(args: tuple[Any, ...], kwargs: dict[str, Any], slot: Slot | None, default: Any = None) -> Any:
    """The argument of a call at ``slot`` (its position and keyword), whichever way it was passed;
    ``default`` where the call leaves it out (or ``slot`` is None)."""
    if slot is None:
        return default
    position, keyword = slot
    if keyword in kwargs:
        return kwargs[keyword]
    return args[position] if position < len(args) else default


# --- scale rules -----------------------------------------------------------------------------------


class ScaleRelations(Protocol):
    """What a scale rule records between the nodes (tensors) of a forward pass (``graph``)."""

    def tie(self, nodes: Iterable[int]) -> None:
        """Give all ``nodes`` one scale."""

    def pin(self, node: int, reason: str) -> None:
        """Fix the scale of ``node`` at ``rho = 0``, for ``reason``."""

    def equation(self, coefficients: dict[int, float]) -> None:
        """Require ``sum(coefficient * rho[node]) == 0``."""


@dataclass
class Op:
    """One call met in a forward pass: the operation's name and spec, its arguments, its floating
    input tensors and the nodes of its floating inputs and outputs; ``where`` says in which module
    it was called (``" in 'block.conv'"``, or empty)."""

    name: str
    spec: OperationSpec
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: list[Tensor]
    in_nodes: list[int]
    out_nodes: list[int]
    where: str = ""

    def fill_value(self) -> Any:
        """The constant the call writes beside its input (``spec.fill_value``; None if none)."""
        return call_argument(self.args, self.kwargs, self.spec.fill_value)


ScaleRule = Callable[[ScaleRelations, Op], None]


def _pin(relations: ScaleRelations, op: Op) -> None:
    reason = f"{op.name}{op.where}"
    for n in op.in_nodes + op.out_nodes:
        relations.pin(n, reason)


def _tie(relations: ScaleRelations, op: Op) -> None:
    relations.tie(op.in_nodes + op.out_nodes)


def _tie_first(relations: ScaleRelations, op: Op) -> None:
    """Output scales with the first input; other inputs (shapes, weights) are constants."""
    relations.tie(op.in_nodes[:1] + op.out_nodes)


def _numbers(op: Op, skip: tuple[str, ...] = ()) -> list[float]:
    values = [a for a in op.args if isinstance(a, numbers.Real) and not isinstance(a, bool)]
    values += [
        v for k, v in op.kwargs.items() if k not in skip and isinstance(v, numbers.Real) and not isinstance(v, bool)
    ]
    return [float(v) for v in values]


def _additive(relations: ScaleRelations, op: Op) -> None:
    """Sums: all operands share one scale; a non-zero constant operand pins them."""
    if any(v != 0 for v in _numbers(op, skip=("alpha",))):
        _pin(relations, op)
    else:
        _tie(relations, op)


def _product(sign_of_second: float) -> ScaleRule:
    def rule(relations: ScaleRelations, op: Op) -> None:
        if len(op.in_nodes) < 2:
            _tie(relations, op)
            return
        for out in op.out_nodes:
            equation = {out: 1.0}
            for position, n in enumerate(op.in_nodes):
                coefficient = -1.0 if position == 0 else -sign_of_second
                equation[n] = equation.get(n, 0.0) + coefficient
            relations.equation(equation)

    return rule


def _multilinear(relations: ScaleRelations, op: Op) -> None:
    for out in op.out_nodes:
        equation = {out: 1.0}
        for n in op.in_nodes:
            equation[n] = equation.get(n, 0.0) - 1.0
        relations.equation(equation)


def _bilinear(relations: ScaleRelations, op: Op) -> None:
    """``x1^T W x2 + b``: multilinear in its inputs; a bias (a constant) fixes the output's scale."""
    if isinstance(call_argument(op.args, op.kwargs, (3, "bias")), Tensor):
        for out in op.out_nodes:
            relations.pin(out, f"{op.name}{op.where} (its bias)")
    _multilinear(relations, op)


def _power(exponent: float | None) -> ScaleRule:
    def rule(relations: ScaleRelations, op: Op) -> None:
        values = _numbers(op) if exponent is None else [exponent]
        if len(op.in_nodes) != 1 or len(values) != 1:
            _pin(relations, op)
            return
        for out in op.out_nodes:
            relations.equation({out: 1.0, op.in_nodes[0]: -values[0]})

    return rule


def _clamp(relations: ScaleRelations, op: Op) -> None:
    """``clamp(min=0)`` is ReLU (tied); any other bound pins."""
    low = call_argument(op.args, op.kwargs, (1, "min"))
    high = call_argument(op.args, op.kwargs, (2, "max"))
    if high is None and (low is None or (isinstance(low, numbers.Number) and low == 0)):
        _tie(relations, op)
    else:
        _pin(relations, op)


def _pad(relations: ScaleRelations, op: Op) -> None:
    """Padding with zeros is tied; with another constant, pinned."""
    (_tie if not op.fill_value() else _pin)(relations, op)


def _compare(relations: ScaleRelations, op: Op) -> None:
    """A comparison (``h > t``, ``h == g``, bucketing by boundaries): a positive rescaling keeps its result
    where both sides scale alike, so two compared tensors are tied (a constant tensor then pins the other)
    and a comparison with zero leaves the scale free; one with a non-zero number fixes the compared
    tensor's scale (``h * (h > 0.5)`` is no ReLU)."""
    constants = [v for v in _numbers(op) if v != 0]
    if constants:
        reason = f"{op.name}{op.where} (a comparison with {constants[0]:g}: its result changes with the scale)"
        for n in op.in_nodes:
            relations.pin(n, reason)
    else:
        _tie(relations, op)


def _by_order(relations: ScaleRelations, op: Op) -> None:
    """Indices chosen by order (argmax, argsort, NMS): one positive factor per input tensor keeps them,
    so the inputs' scales stay free (a concatenation read so gets one scale: ``graph``)."""


def _affine(relations: ScaleRelations, op: Op) -> None:
    """A convolution or linear map whose weight is no parameter (a site records itself): multilinear
    in input and weight, unless a bias pins it."""
    (_pin if isinstance(call_argument(op.args, op.kwargs, (2, "bias")), Tensor) else _multilinear)(relations, op)


# --- normalizations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormalizationSpec:
    """A normalization function, declared by keyword names: where it takes its ``eps`` and running
    statistics, and which attribute and buffers of the module calling it hold them.

    Scaling its input by ``r`` keeps its output exactly when ``eps`` is scaled by
    ``r**2`` and the running mean and variance (if it uses them) by ``r`` and
    ``r**2``: possible when it is called by a module whose ``eps`` attribute and
    running-statistic buffers are what it reads.

    Attributes:
        eps: the function's eps argument (its position and keyword).
        eps_default: the eps the function uses where the call leaves it out (None: one that
            follows the dtype, which no module attribute holds).
        running_mean, running_var: the function's running-statistic arguments (None: it has none).
        eps_attributes: the attributes of the calling module that may hold eps, in the order tried
            (``"eps"`` for torch's modules; a module whose epsilon is named otherwise, such as Hugging
            Face's ``variance_epsilon``, is declared by adding that name: not done by default).
        running_buffers: the calling module's buffers of running mean and variance.
    """

    eps: Slot
    eps_default: float | None
    running_mean: Slot | None = None
    running_var: Slot | None = None
    eps_attributes: tuple[str, ...] = ("eps",)
    running_buffers: tuple[str, str] = ("running_mean", "running_var")

    def running(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """The running mean and variance arguments (None, None if the function has none)."""
        return call_argument(args, kwargs, self.running_mean), call_argument(args, kwargs, self.running_var)

    def uses_running_statistics(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this call reads running statistics (which then scale with the input)."""
        return any(isinstance(t, Tensor) for t in self.running(args, kwargs))

    def eps_attribute(self, module: nn.Module | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The attribute of ``module`` that holds this call's eps as a float, or None."""
        eps = call_argument(args, kwargs, self.eps, self.eps_default)
        for attribute in self.eps_attributes if module is not None else ():
            value = getattr(module, attribute, None)
            if isinstance(value, float) and value == eps:
                return attribute
        return None

    def compensation_problem(
        self, module: nn.Module | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> str | None:
        """Why ``module`` cannot compensate a change of this call's input scale, or None if it can."""
        if self.eps_attribute(module, args, kwargs) is None:
            return "its eps is no float attribute of the module calling it, so it cannot follow the input's scale"
        for tensor, buffer in zip(self.running(args, kwargs), self.running_buffers):
            if isinstance(tensor, Tensor) and getattr(module, buffer, None) is not tensor:
                return f"it reads running statistics that are not its module's {buffer} buffer"
        return None

    def compensated(
        self, input_node: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Normalization:
        """What follows the input scale of this call by ``module`` (which can compensate it)."""
        attribute = self.eps_attribute(module, args, kwargs)
        assert attribute is not None
        return Normalization(
            input_node, attribute, self.running_buffers if self.uses_running_statistics(args, kwargs) else None
        )


@dataclass(frozen=True)
class Normalization:
    """A normalization module in the graph whose input scale is free: its input's node, the attribute
    that holds its eps, and its running-statistic buffers (None where its calls read none)."""

    input_node: int
    eps_attribute: str = "eps"
    running_buffers: tuple[str, str] | None = None


def compensate_normalization(module: nn.Module, log_scale: float, normalization: Normalization) -> None:
    """Make ``module`` give the same output for an input scaled by ``exp(log_scale)``: its eps times
    ``exp(2 log_scale)``, its running mean and variance (if it uses them) times ``exp(log_scale)`` and
    ``exp(2 log_scale)``. What this changes besides buffers is what ``NormalizationConstants`` keeps."""
    factor = math.exp(log_scale)
    setattr(module, normalization.eps_attribute, getattr(module, normalization.eps_attribute) * factor**2)
    if normalization.running_buffers is not None:
        mean, var = normalization.running_buffers
        with torch.no_grad():
            getattr(module, mean).mul_(factor)
            getattr(module, var).mul_(factor**2)


def eps_attributes() -> tuple[str, ...]:
    """Every attribute name a declared normalization may read its eps from (``OPERATIONS``)."""
    names = (spec.normalization.eps_attributes for spec in OPERATIONS.values() if spec.normalization is not None)
    return tuple(dict.fromkeys(name for group in names for name in group))


def normalization_eps(module: nn.Module) -> float:
    """The eps of a normalization module: its first attribute among ``eps_attributes()``."""
    return float(next(getattr(module, name) for name in eps_attributes() if hasattr(module, name)))


class NormalizationConstants:
    """The eps of every module of a model, under every attribute name a declared normalization reads
    it from: what ``compensate_normalization`` changes besides buffers, kept to be put back
    (``safety.ModelSnapshot``, which keeps the buffers)."""

    def __init__(self, model: nn.Module) -> None:
        names = eps_attributes()
        self.values = {
            (module, name): getattr(module, name)
            for module in model.modules()
            for name in names
            if hasattr(module, name)
        }

    def restore(self) -> None:
        """Put back every kept eps."""
        for (module, name), value in self.values.items():
            setattr(module, name, value)


# --- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperationSpec:
    """Everything Part 2 knows of one operation.

    Attributes:
        rule: how a call with a floating output relates the scales of its floating inputs and outputs.
        without_floating_output: how a call without one does: None, not at all (sizes, shapes);
            ``_pin``, a value read into Python, whose later use the trace cannot see; ``_compare``, a
            comparison, whose boolean result changes with the scale of what it compares to a constant;
            ``_by_order``, indices chosen by order; another rule, an in-place write.
        slice_wise: it acts on every element alike and is homogeneous, so the slices of a
            concatenation pass through it with scales of their own (where it keeps the shape).
        channel_wise: it acts over the spatial dimensions of each channel (dimension 1) alone, so the
            slices of a concatenation along channels pass through it.
        concatenation: it joins tensors along a dimension, each keeping a scale of its own.
        fill_value: the argument holding a constant it writes beside its input (padding's value),
            which makes it inhomogeneous where it is not zero.
        normalization: where it takes the constants that follow its input's scale (a normalization).
    """

    rule: ScaleRule = _pin
    without_floating_output: ScaleRule | None = None
    slice_wise: bool = False
    channel_wise: bool = False
    concatenation: bool = False
    fill_value: Slot | None = None
    normalization: NormalizationSpec | None = None


def _table(entries: list[tuple[str, OperationSpec]]) -> dict[str, OperationSpec]:
    """Entries with several names (space-separated) as one entry per name; a name given twice is an error."""
    table: dict[str, OperationSpec] = {}
    for names, spec in entries:
        for name in names.split():
            if name in table:
                raise ValueError(f"operation '{name}' has two entries")
            table[name] = spec
    return table


# degree-1 homogeneous, but not acting on every element (or channel) alike
_TIED = (
    "view reshape flatten unflatten permute transpose t T mT data squeeze unsqueeze expand repeat tile flip roll "
    "narrow select getitem split chunk unbind movedim pixel_shuffle pixel_unshuffle channel_shuffle unfold fold "
    "stack hstack vstack dstack lp_pool1d lp_pool2d max_unpool1d max_unpool2d max_unpool3d rrelu maximum minimum "
    "copy fmax fmin sum mean nansum nanmean amax amin max min median norm std cumsum trace diagonal"
)
_SLICE_WISE = (
    "relu leaky_relu dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout clone contiguous "
    "detach to double half bfloat16 type cpu cuda abs neg positive"
)
_CHANNEL_WISE = (
    "max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices "
    "avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d "
    "adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d adaptive_max_pool1d_with_indices "
    "adaptive_max_pool2d_with_indices adaptive_max_pool3d_with_indices interpolate upsample upsample_nearest "
    "upsample_bilinear"
)

_OPERATIONS: dict[str, OperationSpec] = _table(
    [
        (_TIED, OperationSpec(_tie)),
        (_SLICE_WISE, OperationSpec(_tie, slice_wise=True)),
        (_CHANNEL_WISE, OperationSpec(_tie, channel_wise=True)),
        ("float", OperationSpec(_tie, slice_wise=True, without_floating_output=_pin)),
        ("item tolist int", OperationSpec(without_floating_output=_pin)),
        (
            "gt lt ge le eq ne greater less greater_equal less_equal not_equal bucketize searchsorted",
            OperationSpec(_compare, without_floating_output=_compare),
        ),
        # degree-1 homogeneous values (one factor per input keeps the order) and their indices
        ("topk sort msort kthvalue", OperationSpec(_tie)),
        ("argmax argmin argsort nms", OperationSpec(without_floating_output=_by_order)),
        ("pad", OperationSpec(_pad, channel_wise=True, fill_value=(3, "value"))),
        ("constant_pad_nd", OperationSpec(_pad, channel_wise=True, fill_value=(2, "value"))),
        ("cat", OperationSpec(_tie, concatenation=True)),
        ("prelu expand_as view_as reshape_as type_as", OperationSpec(_tie_first)),
        ("add sub rsub where", OperationSpec(_additive)),
        ("setitem", OperationSpec(_additive, without_floating_output=_additive)),
        ("mul", OperationSpec(_product(+1.0))),
        ("div", OperationSpec(_product(-1.0))),
        ("matmul mm bmm einsum outer inner dot kron", OperationSpec(_multilinear)),
        ("bilinear", OperationSpec(_bilinear)),
        ("pow", OperationSpec(_power(None))),
        ("sqrt", OperationSpec(_power(0.5))),
        ("rsqrt", OperationSpec(_power(-0.5))),
        ("square var", OperationSpec(_power(2.0))),
        ("rdiv reciprocal", OperationSpec(_power(-1.0))),  # c / x: scale -rho
        ("clamp clamp_min", OperationSpec(_clamp)),
        ("conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear", OperationSpec(_affine)),
        (
            "batch_norm instance_norm",
            OperationSpec(
                normalization=NormalizationSpec(
                    (7, "eps"), 1e-5, running_mean=(1, "running_mean"), running_var=(2, "running_var")
                )
            ),
        ),
        ("layer_norm group_norm", OperationSpec(normalization=NormalizationSpec((4, "eps"), 1e-5))),
        # eps=None follows the dtype: no float to compensate
        ("rms_norm", OperationSpec(normalization=NormalizationSpec((3, "eps"), None))),
    ]
)
OPERATIONS: Mapping[str, OperationSpec] = MappingProxyType(_OPERATIONS)  # read-only: one entry per operation above


# --- homogeneity on the data -----------------------------------------------------------------------


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

    def deviation(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], x: Tensor
    ) -> float | None:
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
