"""What every entry point does first: choose the layers, gather the data, trace the graph."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from .adapters import find_affine_layers
from .context import PassContext, RateOptions
from .distributed import Collective, ProcessGroupArg, resolve_process_group
from .errors import MagicInitError
from .graph import LayerGraph, trace_graph
from .inputs import Batch, ForwardFn, all_tensors, default_forward, gather_batch, split_batch
from .safety import evaluating

PROBE_SAMPLES = 2  # samples in the tracing pass


def _describe(batch: Batch) -> str:
    shapes = [f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in all_tensors(batch)]
    return ", ".join(shapes) if shapes else type(batch).__name__


def guard_forward(forward: ForwardFn) -> ForwardFn:
    """``forward`` whose failures become a ``MagicInitError`` naming the input it got."""

    def call(model: nn.Module, batch: Batch) -> Any:
        try:
            return forward(model, batch)
        except MagicInitError:
            raise
        except Exception as exc:
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
        layers: the affine layers the call may change, by qualified name.
        excluded: affine layers left alone, with the reason (skipped, frozen, ...).
        all_layers: every affine layer of the model, in registration order.
        graph: the traced graph, or None if tracing failed.
        notes: things to tell the user.
    """

    context: PassContext
    layers: dict[str, nn.Module]
    excluded: dict[str, str]
    all_layers: dict[str, nn.Module]
    graph: LayerGraph | None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Selection:
    """The affine layers of a model: those to work on, and those left alone with the reason."""

    layers: dict[str, nn.Module]
    excluded: dict[str, str]
    all_layers: dict[str, nn.Module]


def _select_layers(model: nn.Module, skip: Iterable[str], include_frozen: bool) -> _Selection:
    all_layers = find_affine_layers(model)
    if not all_layers:
        raise MagicInitError(
            f"model {type(model).__name__} has no convolution, transposed convolution or linear layer; "
            "magicinit initializes those (nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, nn.Linear)"
        )
    for name, param in model.named_parameters():
        if is_lazy(param):
            raise MagicInitError(
                f"parameter '{name}' is an uninitialized lazy parameter; run one forward pass on a batch "
                "to materialize the model before initializing it"
            )
    skip = [skip] if isinstance(skip, str) else list(skip)
    module_names = {name for name, _ in model.named_modules()}
    for prefix in skip:
        if prefix not in module_names:
            raise MagicInitError(f"skip: no module named '{prefix}' in the model")
    excluded: dict[str, str] = {}
    layers: dict[str, nn.Module] = {}
    for name, module in all_layers.items():
        if any(name == p or name.startswith(p + ".") or p == "" for p in skip):
            excluded[name] = "skipped (skip=...)"
        elif parametrize.is_parametrized(module):
            excluded[name] = "parametrized weight (e.g. weight_norm): left as is"
        elif module.weight.device.type == "meta":
            raise MagicInitError(
                f"layer '{name}': its parameters are on the meta device; materialize the model "
                "(model.to_empty(device=...)) before initializing it"
            )
        elif not module.weight.requires_grad and not include_frozen:
            excluded[name] = "frozen (requires_grad=False): left as is"
        else:
            layers[name] = module
    if not layers:
        reasons = "; ".join(f"'{n}': {r}" for n, r in excluded.items())
        raise MagicInitError(f"no layer left to initialize ({reasons}); unfreeze layers, pass include_frozen=True or skip fewer")
    name, first = next(iter(layers.items()))
    if not first.weight.is_floating_point():
        raise MagicInitError(f"layer '{name}': weights of dtype {first.weight.dtype} are not floating point")
    return _Selection(layers, excluded, all_layers)


def start_session(
    model: nn.Module,
    data: Tensor | Iterable[Batch],
    *,
    samples: int,
    seed: int | None,
    forward: ForwardFn | None,
    skip: Iterable[str],
    include_frozen: bool,
    progress: bool,
    rates: RateOptions,
    process_group: ProcessGroupArg = "default",
) -> Session:
    """Validate the arguments, choose layers, gather the data and trace the graph.

    Raises ``MagicInitError`` before touching the model if anything is wrong.
    With several processes, every rank raises if any rank could not gather its
    data or run the model, so that none waits for the others.
    """
    if not isinstance(model, nn.Module):
        raise MagicInitError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if seed is not None and not isinstance(seed, int):
        raise MagicInitError(f"seed={seed!r}: expected an int or None")
    selection = _select_layers(model, skip, include_frozen)
    collective = resolve_process_group(process_group)
    checked_forward = guard_forward(forward or default_forward)
    error, gathered = None, None
    try:
        gathered = _gather_and_trace(model, data, samples, selection, checked_forward)
    except MagicInitError as exc:
        if collective is None:
            raise
        error = exc
    if collective is not None:  # every rank learns whether all could gather their data and run the model
        collective.agree(error)
    assert gathered is not None
    context = PassContext(
        model=model, batch=gathered.batch, forward=checked_forward, generator=_generator(seed, collective),
        collective=collective, progress=progress, rates=rates,
    )
    return Session(context, selection.layers, selection.excluded, selection.all_layers, gathered.graph, gathered.notes)


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
    graph: LayerGraph | None
    notes: list[str]


def _gather_and_trace(
    model: nn.Module, data: Tensor | Iterable[Batch], samples: int, selection: _Selection, forward: ForwardFn
) -> _Gathered:
    """At most ``samples`` samples of ``data`` on the model's device and dtype, and the graph traced on them."""
    weight = next(iter(selection.layers.values())).weight
    batch = gather_batch(data, samples, weight.device, weight.dtype)
    graph, notes = _trace(model, split_batch(batch, 0, PROBE_SAMPLES), forward, selection.all_layers)
    if graph is not None and not any(name in graph.sites for name in selection.layers):
        raise MagicInitError(
            f"none of the layers to initialize ({', '.join(list(selection.layers)[:5])}...) ran in "
            "forward(model, batch); check forward=... or the layers passed"
        )
    return _Gathered(batch, graph, notes)


def _trace(
    model: nn.Module, probe: Batch, forward: ForwardFn, layers: dict[str, nn.Module]
) -> tuple[LayerGraph | None, list[str]]:
    """The graph, traced on ``probe`` in eval mode, and notes; the model must accept the data."""
    with evaluating(model), torch.no_grad():
        try:
            return trace_graph(model, probe, forward, layers), []
        except MagicInitError:
            raise
        except Exception as exc:  # the tracing mode itself failed; the plain model may still run
            forward(model, probe)
            return None, [
                f"the layer graph could not be traced ({type(exc).__name__}: {exc}); "
                "between-layer rescaling is not possible for this model"
            ]
