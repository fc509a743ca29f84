"""Leaving the user's model as it was: snapshot and restore, modes, temporary hooks.

What restores the model (putting back tensors, modes and flags, removing hooks)
runs with Ctrl-C deferred (``uninterrupted``): a ``KeyboardInterrupt`` arriving
meanwhile is raised once the restore is complete, never halfway through it.

What the model's own forward changes while magicinit runs it (a counter or
statistics kept in buffers, even in eval mode) is undone too: the tracing pass
leaves the model as it was (``observing``), and a call's ``guarded`` block puts
back every buffer when it ends, but those Part 2 wrote on purpose (the running
statistics of a normalization it compensated: ``ModelSnapshot.keep_buffers_of``).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .operations import NormalizationConstants

if TYPE_CHECKING:
    from .sites import WeightUnit

# how deep ``HeldGraphs`` looks into the dicts, lists and tuples a module keeps as attributes
ATTRIBUTE_DEPTH = 4


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Run a block that must not stop halfway (a restore): a SIGINT (Ctrl-C) arriving meanwhile is
    handed to the previous handler when the block ends (by default: ``KeyboardInterrupt`` raised
    there). Only the main thread receives signals; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


class ModelFlags:
    """The train/eval mode of every module and the ``requires_grad`` flag of every parameter.

    Kept by object, not by name, so that modules or parameters a forward pass
    adds meanwhile (created on first call) neither break nor lose the restore.
    """

    def __init__(self, model: nn.Module) -> None:
        self.training = {module: module.training for module in model.modules()}  # parents before children
        self.requires_grad = {param: param.requires_grad for param in model.parameters()}

    def restore(self) -> None:
        """Put back every module's mode, through its own ``train(mode)``, and every parameter's ``requires_grad``.

        Modules go parents first: each ``train`` call sets the module's subtree, and its children's own
        calls come after, so every module ends in its saved mode and every overridden ``train`` runs
        (one that switches graphs, as torchvision's two-graph feature extractors do, or clears a cache
        its eval forwards filled, as timm's LeViT does).
        """
        with uninterrupted():
            for module, training in self.training.items():
                module.train(training)
            for param, requires_grad in self.requires_grad.items():
                param.requires_grad_(requires_grad)


class HeldGraphs:
    """Tensors with autograd history that modules hold as attributes of their own (outside their parameters
    and buffers, also in dicts, lists and tuples): a cache a forward fills, as timm's LeViT fills its
    attention-bias cache in eval mode. Those a block's forwards with grad leave there make the model
    impossible to ``copy.deepcopy``, and keep the graph alive; ``detach_new`` replaces them by their
    detached values (the values a forward without grad would have cached)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.before = self._graph_tensors()  # the tensors themselves, so that their ids stay theirs
        self.known = {id(tensor) for tensor in self.before}

    def _graph_tensors(self) -> list[torch.Tensor]:
        found: list[torch.Tensor] = []

        def record(tensor: torch.Tensor) -> torch.Tensor:
            found.append(tensor)
            return tensor

        for module in self.model.modules():
            for name, value in vars(module).items():
                if name not in ("_parameters", "_modules"):
                    _replace_graphs(value, ATTRIBUTE_DEPTH, record)
        return found

    def detach_new(self) -> None:
        """Replace every tensor with autograd history held in a module attribute since the snapshot by its
        detached value; those held before are left as they were."""

        def detached(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if id(tensor) in self.known else tensor.detach()

        with uninterrupted():
            for module in self.model.modules():
                for name, value in list(vars(module).items()):
                    if name in ("_parameters", "_modules"):
                        continue
                    replaced = _replace_graphs(value, ATTRIBUTE_DEPTH, detached)
                    if replaced is not value:
                        vars(module)[name] = replaced


def _replace_graphs(value: Any, depth: int, replace: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with every tensor that has a ``grad_fn`` in it replaced by ``replace(tensor)``, looking
    ``depth`` levels into dicts and lists (changed in place) and tuples (rebuilt where a tensor in them
    is replaced); ``value`` itself where nothing in it is."""
    if isinstance(value, torch.Tensor):
        return replace(value) if value.grad_fn is not None else value
    if depth <= 0:
        return value
    if isinstance(value, dict):
        for key, item in list(value.items()):
            replaced = _replace_graphs(item, depth - 1, replace)
            if replaced is not item:
                value[key] = replaced
    elif isinstance(value, list):
        for i, item in enumerate(value):
            replaced = _replace_graphs(item, depth - 1, replace)
            if replaced is not item:
                value[i] = replaced
    elif type(value) is tuple or (isinstance(value, tuple) and hasattr(value, "_fields")):  # a namedtuple
        items = [_replace_graphs(item, depth - 1, replace) for item in value]
        if any(new is not old for new, old in zip(items, value)):
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


class ModelSnapshot:
    """A copy of every parameter and buffer of a model, and of every module's eps under the names
    declared normalizations read it from (which Part 2 may change to compensate a normalization's
    input scale: ``operations.NormalizationConstants``); its flags: ``ModelFlags``.

    Buffers are kept by module and name with the tensor object itself, so that one a forward
    replaces (a cache rebuilt on a longer input) is put back as it was.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tensors: dict[str, torch.Tensor] = {}
        self.buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
        self.record_new_tensors()
        self.normalization_constants = NormalizationConstants(model)
        self.kept: set[nn.Module] = set()

    def record_new_tensors(self) -> None:
        """Copy every parameter and buffer the snapshot does not hold yet: all of them when it is taken; later,
        those the model has gained since (a forward that registers a buffer on its first call, in the tracing
        pass), so that they are put back too. A buffer several modules share is copied once."""
        for name, parameter in self.model.named_parameters(remove_duplicate=True):
            if name not in self.tensors:
                self.tensors[name] = parameter.detach().clone()
        recorded = {(id(module), name) for module, name, _, _ in self.buffers}
        copies = {id(tensor): saved for _, _, tensor, saved in self.buffers}
        for module in self.model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and (id(module), name) not in recorded:
                    if id(buffer) not in copies:
                        copies[id(buffer)] = buffer.detach().clone()
                    self.buffers.append((module, name, buffer, copies[id(buffer)]))

    def keep_buffers_of(self, modules: Iterable[nn.Module]) -> None:
        """Leave the buffers of ``modules`` as the block wrote them when ``restore_buffers`` runs
        (the running statistics Part 2 scaled on purpose)."""
        self.kept.update(modules)

    def restore_buffers(self) -> None:
        """Put back every buffer, bit for bit and as the same tensor, but those of the modules kept."""
        with uninterrupted():
            self._put_back_buffers(self.kept)

    def restore(self) -> None:
        """Put back every parameter and buffer (those of the modules kept too), bit for bit, and every eps."""
        with uninterrupted(), torch.no_grad():
            for name, tensor in self.model.named_parameters(remove_duplicate=True):
                if name in self.tensors:
                    tensor.copy_(self.tensors[name])
            self._put_back_buffers(set())
            self.normalization_constants.restore()

    def _put_back_buffers(self, kept: set[nn.Module]) -> None:
        with torch.no_grad():
            for module, name, tensor, saved in self.buffers:
                if module in kept:
                    continue
                if module._buffers.get(name) is not tensor:  # replaced by the forward: the saved one goes back
                    module._buffers[name] = tensor
                if not torch.equal(tensor, saved):  # no write where nothing changed (an expanded buffer)
                    tensor.copy_(saved)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[ModelFlags]:
    """Run a block with ``model`` in eval mode (``model.eval()``); its modes and ``requires_grad`` flags are
    restored after (``ModelFlags``), and a tensor with autograd history that the block's forwards left in
    a module attribute is detached (``HeldGraphs``)."""
    flags = ModelFlags(model)
    held = HeldGraphs(model)
    try:
        model.eval()  # inside the try: a Ctrl-C halfway through it still restores every module's mode
        yield flags
    finally:
        flags.restore()  # first: an overridden train() may clear what the eval forwards cached
        held.detach_new()


@contextmanager
def observing(model: nn.Module, snapshot: ModelSnapshot | None = None) -> Iterator[None]:
    """Run a pass that only looks at ``model`` (the tracing pass) in eval mode: when it ends, however it
    ends, every parameter, buffer and eps is as it was (``ModelSnapshot``; ``snapshot``, of the model as it
    is now, where given), whatever its forward changed (a counter or statistics kept in buffers), and so are
    the modes and flags (``evaluating``)."""
    snapshot = ModelSnapshot(model) if snapshot is None else snapshot
    with evaluating(model):
        try:
            yield
        finally:
            snapshot.restore()


@contextmanager
def guarded(model: nn.Module, snapshot: ModelSnapshot | None = None) -> Iterator[ModelSnapshot]:
    """Run a block on ``model`` in eval mode; on any exception restore every tensor (from ``snapshot``, of
    the model as it is when the block starts, where given: the tracing pass's, which a call shares so
    that it copies every parameter once, not twice).

    Flags (mode, ``requires_grad``) are restored in every case, and so are the
    buffers, but those of the modules the block named (``ModelSnapshot.keep_buffers_of``):
    a forward may update buffers of its own (a counter, even in eval mode), which
    magicinit's forwards must not leave behind. Exceptions include ``KeyboardInterrupt``.
    """
    if snapshot is None:
        snapshot = ModelSnapshot(model)
    else:  # taken before the tracing pass: what that pass added to the model is recorded now
        snapshot.record_new_tensors()
    with evaluating(model):
        try:
            yield snapshot
        except BaseException:
            snapshot.restore()
            raise
        snapshot.restore_buffers()


def restore_after_the_passes(model: nn.Module, snapshot: ModelSnapshot, units: Iterable[WeightUnit]) -> None:
    """Put ``model`` back from ``snapshot`` (every parameter, buffer and eps, bit for bit) and recompute the
    reparametrized weights of ``units`` from it, with Ctrl-C deferred: for an exception that ends a call
    after ``guarded`` has let its block's changes stand (the model's modes and flags are back by then). A
    model ``guarded`` already put back is unchanged by it."""
    with uninterrupted(), torch.no_grad():
        snapshot.restore()
        for unit in units:
            unit.refresh_(model)


class Hooks:
    """Forward hooks registered for one block (see ``temporary_hooks``)."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def before(self, module: nn.Module, hook: Callable[[nn.Module, tuple[Any, ...]], Any]) -> None:
        """``hook(module, args)`` before every call of ``module``."""
        with uninterrupted():  # registered and recorded for removal, or neither
            self.handles.append(module.register_forward_pre_hook(hook))

    def after(self, module: nn.Module, hook: Callable[[nn.Module, tuple[Any, ...], Any], Any]) -> None:
        """``hook(module, args, output)`` after every call of ``module`` (a non-None return replaces the output)."""
        with uninterrupted():
            self.handles.append(module.register_forward_hook(hook))


@contextmanager
def temporary_hooks() -> Iterator[Hooks]:
    """Hooks registered in the block are removed when it ends, however it ends."""
    hooks = Hooks()
    try:
        yield hooks
    finally:
        with uninterrupted():
            for handle in hooks.handles:
                handle.remove()
