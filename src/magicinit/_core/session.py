"""What every entry point does first: choose the layers, gather the data, trace the graph."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .adapters import find_affine_layers
from .context import PassContext
from .distributed import Collective, resolve_process_group
from .errors import MagicInitError
from .graph import LayerGraph, trace_graph
from .inputs import Batch, ForwardFn, all_tensors, default_forward, forward_in_data_layout, gather_batch, split_batch
from .options import Options
from .safety import ModelSnapshot, observing
from .sites import UnitIndex, WeightUnit
from .stopwatch import Stopwatch
from .torch_internals import (
    compiled_original,
    forward_hooks,
    forward_pre_hooks,
    global_forward_hooks,
    name_in_compiled_original,
    reentrant_checkpoints_run_plainly,
)

PROBE_SAMPLES = 2  # samples in the tracing pass


def _describe(batch: Batch) -> str:
    shapes = [f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in all_tensors(batch)]
    return ", ".join(shapes) if shapes else type(batch).__name__


def original_module(model: Any) -> Any:
    """The module a ``torch.compile``'d model wraps (it shares its parameters), else ``model`` itself."""
    original = compiled_original(model) if isinstance(model, nn.Module) else None
    return original if original is not None else model


Entry = TypeVar("Entry", bound=Callable[..., Any])


AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "privateuseone")


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` here (torch before 2.4 answers for the CPU and CUDA only)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: is_autocast_enabled() takes no argument and answers for CUDA
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return device_type == "cuda" and bool(torch.is_autocast_enabled())


def outside_caller_modes(entry: Entry) -> Entry:
    """``entry`` (``init_``, ``rescale_``, ``diagnose``) run with inference mode and autocast off, whatever
    modes its caller is in. Part 2 needs autograd, which ``torch.inference_mode()`` switches off even inside
    ``torch.enable_grad()`` (inference tensors in the data are copied when the data is gathered). Autocast
    keeps one low-precision copy of every weight it casts until its region ends, so that after magicinit
    writes a weight, its later calls would still compute with the weight as it was (Part 1 off target by
    its whole correction); the passes compute in the model's own dtype instead, as its training step will
    see the weights whether or not it runs under autocast. The caller's autocast cache is emptied after,
    so that its own calls in the same region cast the weights magicinit wrote, not those cast before (and
    before every forward magicinit makes: ``guard_forward``, for a model whose forward enters autocast
    itself)."""

    @functools.wraps(entry)
    def run(*args: Any, **kwargs: Any) -> Any:
        autocast = [device_type for device_type in AUTOCAST_DEVICE_TYPES if autocast_enabled(device_type)]
        try:
            with contextlib.ExitStack() as modes:
                modes.enter_context(torch.inference_mode(False))
                for device_type in autocast:
                    modes.enter_context(torch.autocast(device_type, enabled=False))
                return entry(*args, **kwargs)
        finally:
            if autocast:
                torch.clear_autocast_cache()

    return cast(Entry, run)


def guard_forward(forward: ForwardFn) -> ForwardFn:
    """``forward`` whose failures become a ``MagicInitError`` naming the input it got. Inside it,
    ``torch.utils.checkpoint(..., use_reentrant=True)`` runs its function as a plain call (same values), so that
    Part 2 gets gradients through it (``torch_internals.reentrant_checkpoints_run_plainly``)."""

    def call(model: nn.Module, batch: Batch) -> Any:
        # a forward that enters autocast itself, inside the caller's region, would reuse the casts of the weights
        # as an earlier pass saw them: the region's cache only empties when the outermost region ends
        torch.clear_autocast_cache()
        try:
            with reentrant_checkpoints_run_plainly():
                return forward(model, batch)
        except MagicInitError:
            raise
        except Exception as exc:
            empty = [name for name, param in model.named_parameters() if param.numel() == 0]
            if empty:  # torch's own layers refuse such weights (a convolution with 0 output channels)
                raise MagicInitError(
                    f"the model's forward failed: {type(exc).__name__}: {exc}. Its parameter '{empty[0]}' has no "
                    "elements (a layer with 0 output or input features), which the layer itself may refuse: give "
                    "it at least one, or remove it"
                ) from exc
            raise MagicInitError(
                f"the model rejected the init data (batch {_describe(batch)}): {type(exc).__name__}: {exc}. "
                "Pass data the model accepts, or forward=callable(model, batch) for other inputs"
            ) from exc

    return call


@dataclass
class Session:
    """Everything one call works with.

    Attributes:
        context: the model, the init data and what the passes over it share.
        units: the weights the call may change, by name (see ``sites.WeightUnit``).
        excluded: weights left alone, with the reason (skipped, frozen, tied, reparametrized, ...).
        all_units: every weight the report lists, in the model's registration order: those
            used at an affine site, and those of affine modules the forward never called.
        index: the model's weight units and how to recognize them in a call.
        graph: the traced graph.
        snapshot: every parameter, buffer and eps of the model as the call found it (taken for the tracing
            pass, which leaves the model so; ``safety.guarded`` restores from it too).
        notes: things to tell the user.
    """

    context: PassContext
    units: dict[str, WeightUnit]
    excluded: dict[str, str]
    all_units: dict[str, WeightUnit]
    index: UnitIndex
    graph: LayerGraph
    snapshot: ModelSnapshot
    notes: list[str] = field(default_factory=list)


def check_skip_names(model: nn.Module, skip: Iterable[str]) -> list[str]:
    """The ``skip`` names (qualified module or parameter names, or module prefixes) as
    ``original_module(model)`` knows them; ``MagicInitError`` for a name the model lacks.

    A name as a ``torch.compile``'d model lists it (``_orig_mod.backbone``) is accepted and given as the
    module it wraps names it (``backbone``), whether ``model`` is the compiled model or that module: magicinit
    works on the original. What the command line checks ``--skip`` with, before it reads any data.
    """
    original = original_module(model)
    known = {name for name, _ in original.named_modules()}
    known |= {name for name, _ in original.named_parameters(remove_duplicate=False)}
    resolved = []
    for prefix in [skip] if isinstance(skip, str) else skip:
        inner = prefix if prefix in known else name_in_compiled_original(prefix)
        if inner is None or inner not in known:
            raise MagicInitError(
                f"skip: no module or parameter named '{prefix}' in the model; pass qualified names as "
                "model.named_modules() or model.named_parameters() list them"
            )
        resolved.append(inner)
    return resolved


def _check_model(model: nn.Module) -> None:
    """What can be refused before any data is read: lazy or meta parameters."""
    for name, param in model.named_parameters():
        if is_lazy(param):
            raise MagicInitError(
                f"parameter '{name}' is an uninitialized lazy parameter; run one forward pass on a batch "
                "to materialize the model before initializing it"
            )
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            owner, _, attribute = name.rpartition(".")
            layer = owner if attribute in ("weight", "bias") else name
            raise MagicInitError(
                f"layer '{layer}': its parameters are on the meta device; materialize the model "
                "(model.to_empty(device=...)) before initializing it"
            )


def _under(prefix: str, name: str) -> bool:
    """Whether ``skip=[prefix]`` covers the module or parameter ``name``."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _protected_parameters(model: nn.Module, skip: list[str], include_frozen: bool) -> frozenset[str]:
    """Parameters that must not be written: skipped, or frozen (unless ``include_frozen``)."""
    return frozenset(
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if any(_under(prefix, name) for prefix in skip) or (not param.requires_grad and not include_frozen)
    )


def _exclusion(
    unit: WeightUnit, model: nn.Module, graph: LayerGraph, skip: list[str], include_frozen: bool
) -> str | None:
    """Why ``unit`` is left as it is, or None if the call may change it."""
    names = (unit.name, unit.owner, *unit.parameters, *unit.aliases)
    if any(_under(prefix, name) for prefix in skip for name in names):
        return "skipped (skip=...)"
    if unit.read_only is not None:
        return unit.read_only
    if unit.tensor(model).numel() == 0:
        return "its weight has no elements (0 output or input features): nothing to initialize"
    if not include_frozen and not all(p.requires_grad for p in unit.real_parameters(model)):
        return "frozen (requires_grad=False): left as is"
    uses = ", ".join(dict.fromkeys(graph.other_uses.get(unit.name, []))) or "no operation magicinit saw"
    if unit.name in graph.sites and unit.name in graph.other_uses:
        return (
            f"tied: also read outside affine calls (by {uses}), so it is left as is: redrawing it would change "
            "what that operation gives the layers after it"
        )
    if unit.name not in graph.sites:
        if unit.owner in graph.called_modules or unit.name in graph.other_uses:
            return (
                f"read by {uses}, not by an affine call magicinit knows (conv, linear, addmm, or matmul with the "
                "weight on the right): left as is"
            )
    return None


def _is_matrix(unit: WeightUnit, model: nn.Module) -> bool:
    """A weight with at least two dimensions of size above 1 (not a bias, scale or norm parameter)."""
    return unit.kind == "parameter" and sum(size > 1 for size in unit.tensor(model).shape) >= 2


def _select_units(
    model: nn.Module, index: UnitIndex, graph: LayerGraph, skip: list[str], include_frozen: bool
) -> tuple[dict[str, WeightUnit], dict[str, str], dict[str, WeightUnit]]:
    """The weights to work on, those left alone (with the reason), and all the report lists.

    The report lists every weight used at an affine site, every weight of an affine
    module type (called or not), and every other matrix the forward read (an
    embedding table, a weight applied by ``einsum`` or an RNN), which is left alone.
    """
    by_type = {unit.name for name in find_affine_layers(model) if (unit := index.of_module(name)) is not None}
    affine = set(graph.sites) | by_type
    if not affine:
        raise MagicInitError(
            f"model {type(model).__name__} has no convolution, transposed convolution or linear layer, and its "
            "forward makes no affine call (conv, linear, addmm or matmul) with a parameter as weight; magicinit "
            "initializes those"
        )
    read = {name for name in graph.other_uses if name in index.units and _is_matrix(index.units[name], model)}
    all_units = {name: unit for name, unit in index.units.items() if name in affine or name in read}
    units, excluded = {}, {}
    for name, unit in all_units.items():
        reason = _exclusion(unit, model, graph, skip, include_frozen)
        if reason is None:
            units[name] = unit
        else:
            excluded[name] = reason
    if not units:
        reasons = "; ".join(f"'{n}': {r}" for n, r in excluded.items())
        raise MagicInitError(
            f"no layer left to initialize ({reasons}); unfreeze layers, pass include_frozen=True or skip fewer"
        )
    if not any(name in graph.sites for name in units):
        raise MagicInitError(
            f"none of the layers to initialize ({', '.join(list(units)[:5])}...) ran in "
            "forward(model, batch); check forward=... or the layers passed"
        )
    name, first = next(iter(units.items()))
    dtype = first.real_parameters(model)[0].dtype
    if not dtype.is_floating_point:
        raise MagicInitError(f"layer '{name}': weights of dtype {dtype} are not floating point")
    return units, excluded, all_units


def start_session(
    model: nn.Module,
    data: Tensor | Iterable[Batch],
    options: Options,
    stopwatch: Stopwatch | None = None,
) -> Session:
    """Validate the model and data, gather the data, trace the graph and choose the weights, as the (checked)
    ``options`` say; ``stopwatch`` (kept in the session's context) times the stages ``data`` and ``trace``.

    Raises ``MagicInitError`` before touching the model if anything is wrong.
    With several processes, every rank raises if any rank could not gather its
    data or run the model, so that none waits for the others.
    """
    if not isinstance(model, nn.Module):
        raise MagicInitError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise MagicInitError(
            f"model: a TorchScript module ({type(model).__name__}, from torch.jit.script or torch.jit.trace) runs "
            "compiled code magicinit cannot see into; initialize the Python module first, then script it"
        )
    include_frozen, scaling = options.include_frozen, options.scaling
    _check_model(model)
    skip = check_skip_names(model, options.skip)
    index = UnitIndex(model, protected=_protected_parameters(model, skip, include_frozen))
    collective = resolve_process_group(options.process_group)
    if collective is not None:  # before anything waits on the other ranks: the options they decide by agree
        collective.same_options(_options_every_rank_shares(options))
    checked_forward = forward_in_data_layout(guard_forward(options.forward or default_forward), options.sample_dim)
    error, gathered = None, None
    stopwatch = Stopwatch() if stopwatch is None else stopwatch
    try:
        gathered = _gather_and_trace(
            model,
            data,
            options.samples,
            index,
            checked_forward,
            scaling.across_normalization,
            sample_dim=options.sample_dim,
            stopwatch=stopwatch,
        )
    except MagicInitError as exc:
        if collective is None:
            raise
        error = exc
    if collective is not None:  # every rank learns whether all could gather their data and run the model
        collective.agree(error)
    assert gathered is not None
    units, excluded, all_units = _select_units(model, index, gathered.graph, skip, include_frozen)
    context = PassContext(
        model=model,
        batch=gathered.batch,
        forward=checked_forward,
        generator=_generator(options.seed, collective),
        collective=collective,
        progress=options.progress,
        rates=options.rates,
        scaling=scaling,
        stopwatch=stopwatch,
    )
    notes = gathered.notes + _user_hooks(model)
    return Session(context, units, excluded, all_units, index, gathered.graph, gathered.snapshot, notes)


# torch's own forward pre-hooks that recompute a weight (weight_norm, prune, spectral_norm): not the user's
TORCH_REPARAMETRIZATIONS = (WeightNorm, BasePruningMethod, SpectralNorm)


def _user_hooks(model: nn.Module) -> list[str]:
    """A note on the forward hooks of the user's own, which run during the passes: those on modules, and the
    global ones (``register_module_forward_hook``, ``register_module_forward_pre_hook``)."""
    hooked = [
        name or type(model).__name__
        for name, module in model.named_modules()
        if forward_hooks(module)
        or any(not isinstance(hook, TORCH_REPARAMETRIZATIONS) for hook in forward_pre_hooks(module))
    ]
    where = []
    if hooked:
        where.append("on " + ", ".join(f"'{name}'" for name in hooked[:5]) + (", ..." if len(hooked) > 5 else ""))
    global_hooks = global_forward_hooks()
    if global_hooks:
        where.append(
            f"on every module ({len(global_hooks)} global: "
            "torch.nn.modules.module.register_module_forward_hook or register_module_forward_pre_hook)"
        )
    if not where:
        return []
    return [
        f"forward hooks of your own {' and '.join(where)} ran during initialization; the statistics are those "
        "of each layer's own output, so a hook that changes a module's output changes what the layers after it "
        "see (remove such hooks while initializing)"
    ]


# recorded options each rank may set for itself: its own data's cap and layout (its forward and progress bar
# are not recorded)
RANK_OWN_OPTIONS = frozenset({"samples", "sample_dim"})


def _options_every_rank_shares(options: Options) -> dict[str, Any]:
    """The options that must be the same on every rank: those the report records (the sampler by name), but
    ``RANK_OWN_OPTIONS`` and the seed (compared with its own message: ``Collective.shared_seed``), and which
    weights are left alone (``skip``, ``include_frozen``)."""
    own = RANK_OWN_OPTIONS | {"seed"}
    shared = {name: value for name, value in options.settings().items() if name not in own}
    skip = (options.skip,) if isinstance(options.skip, str) else options.skip
    return {**shared, "skip": tuple(sorted(set(skip))), "include_frozen": options.include_frozen}


def _generator(seed: int | None, collective: Collective | None) -> torch.Generator | None:
    """The call's generator: seeded with ``seed`` (None: torch's global one); with several
    processes, seeded alike on every rank (``seed``, or one drawn on rank 0)."""
    if collective is not None:
        return torch.Generator().manual_seed(collective.shared_seed(seed))
    return torch.Generator().manual_seed(seed) if seed is not None else None


@dataclass(frozen=True)
class _Gathered:
    """The init data as one batch, the graph traced on its first samples, and notes on the tracing."""

    batch: Batch
    graph: LayerGraph
    notes: list[str]
    snapshot: ModelSnapshot  # the model as it was before the tracing pass, and is again after it


def _gather_and_trace(
    model: nn.Module,
    data: Tensor | Iterable[Batch],
    samples: int,
    index: UnitIndex,
    forward: ForwardFn,
    across_normalization: bool = False,
    *,
    sample_dim: int = 0,
    stopwatch: Stopwatch,
) -> _Gathered:
    """At most ``samples`` samples of ``data`` on the model's device and dtype, and the graph traced on them
    (``across_normalization``: see ``ScaleOptions``; ``sample_dim``: see ``gather_batch``), timed as the stages
    ``data`` and ``trace``."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None:
        raise MagicInitError(f"model {type(model).__name__} has no floating-point parameter to initialize")
    with stopwatch.stage("data"):
        batch = gather_batch(data, samples, weight.device, weight.dtype, sample_dim)
    with stopwatch.stage("trace"):
        snapshot = ModelSnapshot(model)
        probe = split_batch(batch, 0, PROBE_SAMPLES)
        graph, notes = _trace(model, probe, forward, index, across_normalization, snapshot)
    return _Gathered(batch, graph, notes, snapshot)


def _trace(
    model: nn.Module,
    probe: Batch,
    forward: ForwardFn,
    index: UnitIndex,
    across_normalization: bool = False,
    snapshot: ModelSnapshot | None = None,
) -> tuple[LayerGraph, list[str]]:
    """The graph, traced on ``probe`` in eval mode, and notes. The model is left as it was, whatever
    the forward changes in it (a counter kept in a buffer): ``safety.observing``, from ``snapshot`` (of the
    model as it is now) where given.

    If tracing fails, the model runs on ``probe`` as it is: an error there is
    the data's (or the model's). If it runs, the tracing is tried again: a forward
    that fails on its first call alone is said to be one; an error that only the
    tracing mode brings about is said to be magicinit's.
    """
    with observing(model, snapshot), torch.no_grad():
        try:
            return trace_graph(model, probe, forward, index, across_normalization=across_normalization), []
        except Exception as exc:
            forward(model, probe)  # raises the data's error, if it is one
            cause = exc.__cause__ if isinstance(exc, MagicInitError) and exc.__cause__ is not None else exc
            try:
                trace_graph(model, probe, forward, index, across_normalization=across_normalization)
            except Exception:
                pass  # it fails under the tracing mode every time
            else:
                raise MagicInitError(
                    f"the model's forward failed on its first call ({type(cause).__name__}: {cause}), and ran on "
                    "the same init data when called again; run one forward pass on a batch before initializing "
                    "the model (as for a lazy setup that completes on the first call), so that magicinit sees the "
                    "model as it will be"
                ) from exc
            raise MagicInitError(
                f"the model runs on the init data, but not under magicinit's TorchFunctionMode, which it needs "
                f"to find the affine calls ({type(cause).__name__}: {cause}); magicinit cannot initialize this forward "
                "(a model compiled as a whole is unwrapped; compiled submodules are not)"
            ) from exc
