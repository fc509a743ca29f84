"""What every entry point does first: choose the layers, gather the data, trace the graph."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from .distributed import Collective, ProcessGroupArg, resolve_process_group
from .errors import MagicInitError
from .graph import LayerGraph, trace_graph
from .inputs import Batch, ForwardFn, all_tensors, default_forward, gather_batch, split_batch
from .layers import find_affine_layers

__all__ = ["Session", "start_session", "guard_forward", "PROBE_SAMPLES"]

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
        layers: the affine layers the call may change, by qualified name.
        excluded: affine layers left alone, with the reason (skipped, frozen, ...).
        batch: the init data as one batch on the model's device.
        forward: the guarded forward callable.
        generator: the random generator (None: torch's global one); the same on every rank.
        collective: the processes whose statistics are reduced together (None: this one alone).
        graph: the traced graph, or None if tracing failed.
        notes: things to tell the user.
    """

    model: nn.Module
    layers: dict[str, nn.Module]
    excluded: dict[str, str]
    all_layers: dict[str, nn.Module]
    batch: Batch
    forward: ForwardFn
    generator: torch.Generator | None
    collective: Collective | None = None
    graph: LayerGraph | None = None
    notes: list[str] = field(default_factory=list)

    def probe(self) -> Batch:
        """The first few samples, for cheap passes that only look at structure."""
        return split_batch(self.batch, 0, PROBE_SAMPLES)


def start_session(
    model: nn.Module,
    data: Tensor | Iterable[Batch],
    *,
    samples: int,
    seed: int | None,
    forward: ForwardFn | None,
    skip: Iterable[str],
    include_frozen: bool,
    process_group: ProcessGroupArg = "default",
) -> Session:
    """Validate the arguments, choose layers, gather the data and trace the graph.

    Raises ``MagicInitError`` before touching the model if anything is wrong.
    """
    if not isinstance(model, nn.Module):
        raise MagicInitError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if seed is not None and not isinstance(seed, int):
        raise MagicInitError(f"seed={seed!r}: expected an int or None")
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
    weight = next(iter(layers.values())).weight
    if not weight.is_floating_point():
        raise MagicInitError(f"layer '{next(iter(layers))}': weights of dtype {weight.dtype} are not floating point")
    collective = resolve_process_group(process_group)
    if collective is None:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return _gather_and_trace(model, data, samples, forward, layers, excluded, all_layers, weight, generator)
    # every rank learns whether all could gather their data and run the model, so none waits for the others
    error, session = None, None
    try:
        session = _gather_and_trace(model, data, samples, forward, layers, excluded, all_layers, weight, None)
    except MagicInitError as exc:
        error = exc
    collective.agree(error)
    assert session is not None
    session.generator = torch.Generator().manual_seed(collective.shared_seed(seed))
    session.collective = collective
    return session


def _gather_and_trace(
    model: nn.Module,
    data: Tensor | Iterable[Batch],
    samples: int,
    forward: ForwardFn | None,
    layers: dict[str, nn.Module],
    excluded: dict[str, str],
    all_layers: dict[str, nn.Module],
    weight: Tensor,
    generator: torch.Generator | None,
) -> Session:
    batch = gather_batch(data, samples, weight.device, weight.dtype)
    session = Session(model, layers, excluded, all_layers, batch, guard_forward(forward or default_forward), generator)
    session.graph = _trace(session)
    if session.graph is not None and not any(name in session.graph.sites for name in layers):
        raise MagicInitError(
            f"none of the layers to initialize ({', '.join(list(layers)[:5])}...) ran in forward(model, batch); "
            "check forward=... or the layers passed"
        )
    return session


def _trace(session: Session) -> LayerGraph | None:
    """Trace on a probe batch in eval mode; the model must accept the data."""
    model, probe = session.model, session.probe()
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            try:
                return trace_graph(model, probe, session.forward, session.all_layers)
            except MagicInitError:
                raise
            except Exception as exc:  # the tracing mode itself failed; the plain model may still run
                session.forward(model, probe)
                session.notes.append(
                    f"the layer graph could not be traced ({type(exc).__name__}: {exc}); "
                    "between-layer rescaling is not possible for this model"
                )
                return None
    finally:
        for module, training in modes.items():
            module.training = training
