"""Affine sites and the weights they use: what the method initializes, found by the calls a forward makes.

A *site* is one call of a linear map, convolution, transposed convolution,
``addmm`` or matrix product whose weight is a trainable parameter of the
model, a view of one (a slice, a transpose), or the tensor a weight
reparametrization computes from its parameters (``weight_norm``, ``prune``).
It does not matter where the call is made: in a module's own forward, in
torch's functional code inside another module (attention's packed
``in_proj_weight``), or in the user's forward. Sites are recognized by a
``TorchFunctionMode`` (``CallInterceptor``) from the function called and the
identity of its weight argument, never from module types.

A *weight unit* is what one report entry describes and what Parts 1 and 2
change: one parameter (named after its module when it is the module's
``weight``: ``"fc"``, else by the parameter's own name:
``"encoder.layers.0.self_attn.in_proj_weight"``), or one reparametrized weight
(its real parameters, e.g. ``weight_g`` and ``weight_v``, are what is written).

Torch's attention (``F.multi_head_attention_forward``) is one torch function
whose inner calls a mode does not see; ``COMPOSITES`` lists such functions,
which the interceptor runs with itself active inside them, so that their
linear maps are sites like any other (a ``CallInterceptor`` takes another set
through its ``composites`` argument).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode

from .adapters import (
    CONV,
    CONV_TRANSPOSE,
    LINEAR,
    MATMUL,
    AffineAdapter,
    Layout,
    module_adapter,
)
from .errors import MagicInitError
from .operations import Slot, call_argument
from .torch_internals import (
    forward_pre_hooks,
    parametrization_cache_enabled,
    pruned_tensor_name,
    view_base,
    without_torch_function_dispatch,
)


def op_name(func: Callable[..., Any]) -> str:
    """Canonical name of a torch function: ``Tensor.__iadd__`` and ``torch.add_`` become ``add``."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    dunder = name.startswith("__") and name.endswith("__")
    name = name.strip("_")
    if dunder and name[:1] in "ri" and name[1:] in _REFLECTED:
        name = ("r" if name[0] == "r" else "") + name[1:]
    return _ALIASES.get(name, name)


_REFLECTED = {"add", "sub", "mul", "div", "truediv", "matmul", "pow"}
_ALIASES = {
    "radd": "add",
    "rmul": "mul",
    "truediv": "div",
    "true_divide": "div",
    "divide": "div",
    "rtruediv": "rdiv",
    "multiply": "mul",
    "subtract": "sub",
    "rmatmul": "matmul",
    "concat": "cat",
    "concatenate": "cat",
    "clip": "clamp",
    "absolute": "abs",
    "negative": "neg",
}


# --- sites ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteKind:
    """Where an affine function takes its input, weight, bias and groups, and its filter layout."""

    adapter: AffineAdapter
    input: Slot
    weight: Slot
    bias: Slot | None = None
    groups: Slot | None = None


_LINEAR = SiteKind(LINEAR, input=(0, "input"), weight=(1, "weight"), bias=(2, "bias"))
_CONV = SiteKind(CONV, input=(0, "input"), weight=(1, "weight"), bias=(2, "bias"), groups=(6, "groups"))
_CONV_T = SiteKind(CONV_TRANSPOSE, input=(0, "input"), weight=(1, "weight"), bias=(2, "bias"), groups=(6, "groups"))
SITE_KINDS: dict[str, SiteKind] = {
    "linear": _LINEAR,
    "conv1d": _CONV,
    "conv2d": _CONV,
    "conv3d": _CONV,
    "conv_transpose1d": _CONV_T,
    "conv_transpose2d": _CONV_T,
    "conv_transpose3d": _CONV_T,
    "addmm": SiteKind(MATMUL, input=(1, "mat1"), weight=(2, "mat2"), bias=(0, "input")),
    "matmul": SiteKind(MATMUL, input=(0, "input"), weight=(1, "other")),
    "mm": SiteKind(MATMUL, input=(0, "input"), weight=(1, "mat2")),
}


@dataclass
class SiteCall:
    """One call of an affine function whose weight belongs to ``unit``."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    kind: SiteKind
    unit: WeightUnit

    @property
    def input(self) -> Tensor:
        """The input the weight is applied to."""
        return call_argument(self.args, self.kwargs, self.kind.input)

    @property
    def weight(self) -> Tensor:
        """The weight tensor of the call (the parameter, a view of it, or a reparametrization's result)."""
        return call_argument(self.args, self.kwargs, self.kind.weight)

    @property
    def bias(self) -> Tensor | None:
        """The bias added by the call, or None."""
        bias = call_argument(self.args, self.kwargs, self.kind.bias)
        return bias if isinstance(bias, Tensor) else None

    @property
    def groups(self) -> int:
        """Convolution groups (1 for other kinds)."""
        return int(call_argument(self.args, self.kwargs, self.kind.groups, 1))

    @property
    def adapter(self) -> AffineAdapter:
        """The filter layout of the call's weight."""
        return self.kind.adapter

    @property
    def through_view(self) -> bool:
        """Whether the site uses a view of its weight's parameter (a slice, a transpose)."""
        return self.unit.kind == "parameter" and view_base(self.weight) is not None

    @property
    def layout(self) -> Layout:
        """The filter layout and groups of the unit's own tensor, as this site sees it: the site's
        own where it uses the weight itself or a slice of a matrix along its channels; the other
        matrix layout for a transposed matrix; else one filter per row."""
        if not self.through_view:
            return self.adapter, self.groups
        weight, base = self.weight, view_base(self.weight)
        assert base is not None  # through_view
        if self.adapter in (LINEAR, MATMUL) and weight.dim() == base.dim() == 2:
            transposed = (weight.stride(0) < weight.stride(1)) != (base.stride(0) < base.stride(1))
            if not transposed:
                return self.adapter, 1
            return (MATMUL if self.adapter is LINEAR else LINEAR), 1
        return CONV, 1

    def call(self, **replaced: Any) -> Any:
        """The function called again with some of ``input``, ``weight``, ``bias`` replaced.

        ``bias=None`` drops the bias (a zero bias where the function needs one: ``addmm``).
        """
        args, kwargs = list(self.args), dict(self.kwargs)
        for slot_name, value in replaced.items():
            slot = getattr(self.kind, slot_name)
            if slot is None:  # a function without bias (matmul): nothing to drop
                continue
            if slot_name == "bias" and value is None and self.kind.adapter is MATMUL:
                value = torch.zeros((), dtype=self.weight.dtype, device=self.weight.device)
            position, keyword = slot
            if keyword in kwargs or position >= len(args):
                kwargs[keyword] = value
            else:
                args[position] = value
        return self.func(*args, **kwargs)

    def patches(self, layer_input: Tensor) -> Tensor | None:
        """The input patches each filter sees: ``(groups, patches, fan_in)``, or None if unsupported.

        A convolution's patches come from the call itself made with identity
        filters, so stride, padding, dilation and groups are the call's, in the
        filters' own element order. A linear map's or matrix product's patches
        are its input rows. Transposed convolutions have no patches in this
        sense (None).
        """
        adapter, weight = self.adapter, self.weight
        if adapter.transposed:
            return None
        if adapter.channels_last_in_output:
            fan = weight.shape[0] if adapter.weight_in_out else weight.shape[1]
            return layer_input.reshape(1, -1, fan)
        groups = self.groups
        fan = weight[0].numel()
        identity = torch.eye(fan, dtype=layer_input.dtype, device=layer_input.device)
        identity = identity.reshape(fan, *weight.shape[1:]).repeat(groups, *([1] * (weight.dim() - 1)))
        columns = self.call(input=layer_input, weight=identity, bias=None)  # (N, groups * fan, *positions)
        n = columns.shape[0]
        return columns.reshape(n, groups, fan, -1).permute(1, 0, 3, 2).reshape(groups, -1, fan)


def _storage_positions(view: Tensor, base: Tensor) -> Tensor:
    """The positions (in ``base``'s storage, from its start) of every element of ``view``."""
    positions = torch.full((), view.storage_offset() - base.storage_offset(), dtype=torch.int64)
    for size, stride in zip(view.shape, view.stride()):
        positions = positions.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return positions.flatten()


def _span(view: Tensor, base: Tensor) -> tuple[int, int]:
    """The first and last storage positions ``view`` reads (relative to ``base``)."""
    start = view.storage_offset() - base.storage_offset()
    extent = sum((size - 1) * stride for size, stride in zip(view.shape, view.stride()) if size > 0)
    return int(start), int(start + extent)


class FirstUses:
    """Which parts of each weight a site has used so far: a site is a weight's *first use* if it
    reads none of the elements an earlier site read (the packed attention projection used as q
    rows at one site and as k, v rows at another has two first uses)."""

    def __init__(self) -> None:
        self._whole: set[str] = set()
        self._views: dict[str, list[Tensor]] = {}

    def claim(self, site: SiteCall) -> bool:
        """Whether ``site`` reads no element of its weight that an earlier site read; marks them read.

        Raises ``MagicInitError`` for a view that reads one element at several places
        (``expand``): its filters cannot be set channel by channel.
        """
        name = site.unit.name
        if name in self._whole:
            return False
        if not site.through_view:
            if name in self._views:
                return False
            self._whole.add(name)
            return True
        weight, base = site.weight, view_base(site.weight)
        assert base is not None  # through_view
        start, stop = _span(weight, base)
        mine: Tensor | None = None
        for earlier in self._views.get(name, []):
            earlier_start, earlier_stop = _span(earlier, base)
            if earlier_stop < start or stop < earlier_start:
                continue  # apart in memory (q rows and k, v rows): no element to compare
            mine = _storage_positions(weight, base) if mine is None else mine
            if bool(torch.isin(mine, _storage_positions(earlier, base)).any()):
                return False
        if any(stride == 0 for size, stride in zip(weight.shape, weight.stride()) if size > 1):
            raise MagicInitError(
                f"weight '{name}' is applied through an expanded view (one element at several places), whose "
                f"filters cannot be set channel by channel; leave it out with skip=['{name}']"
            )
        self._views.setdefault(name, []).append(weight)
        return True


# --- weight units ---------------------------------------------------------------------------------


@dataclass
class WeightUnit:
    """One weight the method may change, and how to write it.

    Attributes:
        name: the name reports use.
        owner: qualified name of the module that holds the weight.
        owner_type: that module's class name.
        attribute: the owner's attribute the forward reads (``"weight"``, ``"in_proj_weight"``).
        kind: ``"parameter"``, or the reparametrization: ``"weight_norm"``, ``"prune"`` (both
            written through their real parameters), ``"parametrization"``, ``"spectral_norm"``.
        parameters: qualified names of the real parameters behind the weight.
        aliases: other qualified names of the same parameter (a parameter shared by modules).
        read_only: why the weight cannot be written (None where it can).
        norm_dim: the dimension ``weight_norm`` normalizes over.
    """

    name: str
    owner: str
    owner_type: str
    attribute: str
    kind: str = "parameter"
    parameters: tuple[str, ...] = ()
    aliases: list[str] = field(default_factory=list)
    read_only: str | None = None
    norm_dim: int = 0

    def real_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters behind the weight, in ``model`` (or a copy of it)."""
        return [model.get_parameter(name) for name in self.parameters]

    def tensor(self, model: nn.Module) -> Tensor:
        """The weight as the forward uses it: the parameter, or the reparametrization's latest result."""
        if self.kind == "parameter":
            return model.get_parameter(self.parameters[0])
        return getattr(model.get_submodule(self.owner), self.attribute)

    def write_(self, model: nn.Module, at_site: Tensor, weight: Tensor) -> None:
        """Make the weight used at a site ``at_site`` (the parameter, a view of it, or the
        reparametrization's result) equal to ``weight``, through the real parameters."""
        if self.kind == "parameter":
            at_site.copy_(weight)
        elif self.kind == "weight_norm":
            g, v = self.real_parameters(model)
            v.copy_(weight)
            g.copy_(torch.norm_except_dim(weight, 2, self.norm_dim))
        elif self.kind == "prune":
            self.real_parameters(model)[0].copy_(weight)
        else:
            raise AssertionError(f"weight '{self.name}' ({self.kind}) is read-only: {self.read_only}")

    def refresh_(self, model: nn.Module) -> None:
        """Recompute a ``weight_norm``/``prune`` hook's attribute from the real parameters (call without grad)."""
        if self.kind not in ("weight_norm", "prune"):
            return
        module = model.get_submodule(self.owner)
        for hook in forward_pre_hooks(module):
            if isinstance(hook, WeightNorm) and self.kind == "weight_norm" and hook.name == self.attribute:
                setattr(module, self.attribute, hook.compute_weight(module))
            elif (
                isinstance(hook, BasePruningMethod)
                and self.kind == "prune"
                and pruned_tensor_name(hook) == self.attribute
            ):
                setattr(module, self.attribute, hook.apply_mask(module))

    def scale_(self, model: nn.Module, factor: float) -> None:
        """Multiply the weight by ``factor``, through the real parameters (``weight_norm``: its magnitude g)."""
        if self.kind in ("parameter", "weight_norm", "prune"):
            self.real_parameters(model)[0].mul_(factor)
        else:
            raise AssertionError(f"weight '{self.name}' ({self.kind}) is read-only: {self.read_only}")

    def scale_input_slices_(self, model: nn.Module, factors: list[float], sizes: tuple[int, ...]) -> None:
        """Multiply consecutive slices of the weight's input channels (dimension 1) by ``factors``,
        through the real parameters (``prune``: its original weight; ``weight_norm``: direction and
        magnitude rewritten, since the magnitude is per output channel)."""
        weight = self.tensor(model)
        shape = [1] * weight.dim()
        shape[1] = -1
        multiplier = torch.repeat_interleave(
            torch.tensor(factors, dtype=weight.dtype, device=weight.device),
            torch.tensor(sizes, device=weight.device),
        ).view(shape)
        if self.kind in ("parameter", "prune"):
            self.real_parameters(model)[0].mul_(multiplier)
        else:
            self.write_(model, weight, weight.detach() * multiplier)


def _unit_name(owner: str, attribute: str) -> str:
    if attribute == "weight":
        return owner
    return f"{owner}.{attribute}" if owner else attribute


class UnitIndex:
    """Every weight unit of a model, and which unit a tensor met in a call belongs to.

    ``protected`` names parameters that must not be written (frozen or skipped): a
    bias among them is used as it is, like a bias that is no parameter.
    """

    def __init__(self, model: nn.Module, protected: frozenset[str] = frozenset()) -> None:
        self._protected = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in protected}
        self.units: dict[str, WeightUnit] = {}
        self._reparametrized: list[tuple[WeightUnit, nn.Module]] = []
        self._of_parameter: dict[int, WeightUnit] = {}
        self._parameter_names: dict[int, str] = {}
        claimed: set[str] = set()
        modules = dict(model.named_modules())
        for owner, module in modules.items():
            for unit in _reparametrizations(owner, module):
                self._reparametrized.append((unit, module))
                claimed.update(unit.parameters)
        by_name = {unit.parameters[0]: unit for unit, _ in self._reparametrized if unit.parameters}
        names_of: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(param), []).append(name)
        for name, param in model.named_parameters():
            self._parameter_names[id(param)] = name
            if name in claimed:
                if name in by_name:
                    self.units[by_name[name].name] = by_name[name]
                continue
            names = _affine_module_weights_first(names_of[id(param)], modules)
            owner, _, attribute = names[0].rpartition(".")
            unit_name = _unit_name(owner, attribute)
            unit = WeightUnit(
                name=unit_name if unit_name not in self.units else names[0],
                owner=owner,
                owner_type=type(modules[owner]).__name__,
                attribute=attribute,
                parameters=(names[0],),
                aliases=names[1:],
            )
            self.units[unit.name] = unit
            self._of_parameter[id(param)] = unit
        self._module_weights = {unit.owner: unit for unit in self.units.values() if unit.attribute == "weight"}

    def resolve(self, tensor: Any) -> WeightUnit | None:
        """The unit ``tensor`` is, or is a view of, or is computed by; None for anything else."""
        if not isinstance(tensor, Tensor):
            return None
        unit = _of_tensor_or_its_base(self._of_parameter, tensor)
        if unit is not None:
            return unit
        for unit, module in self._reparametrized:
            if unit.kind == "parametrization" and not parametrization_cache_enabled():
                continue  # recomputed on every access: recognizable only while cached (the trace)
            try:
                if getattr(module, unit.attribute) is tensor:
                    return unit
            except Exception:  # an attribute a reparametrization computes only in its forward
                continue
        return None

    def parameter_of(self, tensor: Any) -> str | None:
        """The qualified name of the parameter ``tensor`` is, or is a view of; None for anything else."""
        return _of_tensor_or_its_base(self._parameter_names, tensor) if isinstance(tensor, Tensor) else None

    def writable(self, tensor: Any) -> str | None:
        """The name of the parameter ``tensor`` is (or is a view of) if it may be written, else None."""
        name = self.parameter_of(tensor)
        if name is None:
            return None
        param = tensor if id(tensor) in self._parameter_names else view_base(tensor)
        return None if id(param) in self._protected else name

    def of_module(self, module_name: str) -> WeightUnit | None:
        """The unit of the module's ``weight`` (for modules that are affine by type)."""
        return self._module_weights.get(module_name)


@contextmanager
def refreshed(model: nn.Module, units: Iterable[WeightUnit]) -> Iterator[None]:
    """When the block ends, however it ends, recompute without grad the weights that ``weight_norm``
    and ``prune`` hooks keep as attributes, so that they show the parameters' present values and
    hold no graph (a model holding one cannot be deep-copied)."""
    try:
        yield
    finally:
        with torch.no_grad():
            for unit in units:
                unit.refresh_(model)


def _of_tensor_or_its_base(table: dict[int, Any], tensor: Tensor) -> Any:
    """``table``'s entry (keyed by tensor id) for ``tensor``, or for the tensor it is a view of."""
    entry = table.get(id(tensor))
    if entry is None and view_base(tensor) is not None:
        entry = table.get(id(view_base(tensor)))
    return entry


def _affine_module_weights_first(names: list[str], modules: dict[str, nn.Module]) -> list[str]:
    """A parameter's qualified names (one per place it is registered), the ``weight`` of an affine
    module (conv, linear) first: a weight tied to an embedding is named after the layer that applies it."""

    def affine_weight(name: str) -> bool:
        owner, _, attribute = name.rpartition(".")
        return attribute == "weight" and module_adapter(modules[owner]) is not None

    return sorted(names, key=lambda name: not affine_weight(name))


def _reparametrizations(owner: str, module: nn.Module) -> Iterator[WeightUnit]:
    """Units for the reparametrized weights of one module (hooks of torch.nn.utils, or parametrize)."""
    prefix = f"{owner}." if owner else ""
    kind_type = type(module).__name__
    for hook in forward_pre_hooks(module):
        if isinstance(hook, WeightNorm):
            yield WeightUnit(
                name=_unit_name(owner, hook.name),
                owner=owner,
                owner_type=kind_type,
                attribute=hook.name,
                kind="weight_norm",
                parameters=(f"{prefix}{hook.name}_g", f"{prefix}{hook.name}_v"),
                norm_dim=hook.dim,
            )
        elif isinstance(hook, BasePruningMethod):
            pruned = pruned_tensor_name(hook)
            yield WeightUnit(
                name=_unit_name(owner, pruned),
                owner=owner,
                owner_type=kind_type,
                attribute=pruned,
                kind="prune",
                parameters=(f"{prefix}{pruned}_orig",),
            )
        elif isinstance(hook, SpectralNorm):
            yield WeightUnit(
                name=_unit_name(owner, hook.name),
                owner=owner,
                owner_type=kind_type,
                attribute=hook.name,
                kind="spectral_norm",
                parameters=(f"{prefix}{hook.name}_orig",),
                read_only="reparametrized by spectral_norm (torch.nn.utils.spectral_norm): its scale is "
                "normalized away on every call, so magicinit leaves it as it is",
            )
    if parametrize.is_parametrized(module):
        parametrizations = module.parametrizations
        assert isinstance(parametrizations, nn.ModuleDict)  # is_parametrized
        for attribute, chain in parametrizations.items():
            assert isinstance(chain, parametrize.ParametrizationList)
            names = [name for name, _ in chain.named_parameters(recurse=False)]
            kinds = ", ".join(type(p).__name__ for p in chain)
            yield WeightUnit(
                name=_unit_name(owner, attribute),
                owner=owner,
                owner_type=kind_type,
                attribute=attribute,
                kind="parametrization",
                parameters=tuple(f"{prefix}parametrizations.{attribute}.{n}" for n in names),
                read_only=f"parametrized by {kinds} (torch.nn.utils.parametrize): left as is",
            )


# --- the interceptor -------------------------------------------------------------------------------

# Torch functions whose inner calls should be seen: run with the mode active inside them.
COMPOSITES: frozenset[Callable[..., Any]] = frozenset({F.multi_head_attention_forward})


class CallInterceptor(TorchFunctionMode):
    """A ``TorchFunctionMode`` that recognizes affine sites; subclasses decide what to do with each call.

    ``composites``: torch functions written in Python whose inner calls it should see (by default
    ``COMPOSITES``; pass ``COMPOSITES | {f}`` to add one): each runs as a copy whose own
    torch-function dispatch is off (``torch_internals.without_torch_function_dispatch``), with
    the mode active inside it, so that its linear maps are sites like any other.
    """

    def __init__(self, index: UnitIndex, composites: frozenset[Callable[..., Any]] = COMPOSITES) -> None:
        super().__init__()
        self.index = index
        self.composites = composites
        self._copies: dict[Callable[..., Any], Callable[..., Any]] = {}

    def __torch_function__(self, func, types_, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in self.composites:
            if func not in self._copies:
                self._copies[func] = without_torch_function_dispatch(func)
            with self:
                return self._copies[func](*args, **kwargs)
        site = self.recognize(func, args, kwargs)
        if site is None:
            return self.on_call(func, args, kwargs, site)
        try:
            return self.on_call(func, args, kwargs, site)
        except TypeError as error:  # an operator (``x @ W``) would turn it into NotImplemented, silently
            raise RuntimeError(f"at the affine site of '{site.unit.name}': {error}") from error

    def recognize(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> SiteCall | None:
        """The site this call is, or None."""
        kind = SITE_KINDS.get(op_name(func))
        raw = getattr(func, "__name__", "")
        if kind is None or raw.startswith(("__r", "__i")) or (raw.endswith("_") and not raw.endswith("__")):
            return None  # not affine, or its reflected (``W @ x`` from the right) or in-place form
        weight = call_argument(args, kwargs, kind.weight)
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            return None
        if weight.dim() < (2 if kind.adapter in (LINEAR, MATMUL) else 3):
            return None  # a vector "weight" (F.linear(x, v)) or a malformed call: no channels to normalize
        if kind.adapter is MATMUL:
            scaled = any(kwargs.get(k, 1) != 1 for k in ("beta", "alpha"))
            if weight.dim() != 2 or scaled:
                return None
        unit = self.index.resolve(weight)
        return None if unit is None else SiteCall(func, args, kwargs, kind, unit)

    def on_call(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], site: SiteCall | None
    ) -> Any:
        """Handle one call (``site`` is None unless it is an affine site); by default just make it."""
        return func(*args, **kwargs)
