"""Leaving the user's model as it was: snapshot and restore, modes, temporary hooks.

What restores the model (putting back tensors, modes and flags, removing hooks)
runs with Ctrl-C deferred (``uninterrupted``): a ``KeyboardInterrupt`` arriving
meanwhile is raised once the restore is complete, never halfway through it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .operations import NormalizationConstants


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
        self.training = {module: module.training for module in model.modules()}
        self.requires_grad = {param: param.requires_grad for param in model.parameters()}

    def restore(self) -> None:
        """Put back every module's mode and every parameter's ``requires_grad``."""
        with uninterrupted():
            for module, training in self.training.items():
                module.training = training
            for param, requires_grad in self.requires_grad.items():
                param.requires_grad_(requires_grad)


class ModelSnapshot:
    """A copy of every parameter and buffer of a model, and of every module's eps under the names
    declared normalizations read it from (which Part 2 may change to compensate a normalization's
    input scale: ``operations.NormalizationConstants``); its flags: ``ModelFlags``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tensors = {name: t.detach().clone() for name, t in self._state(model)}
        self.normalization_constants = NormalizationConstants(model)

    @staticmethod
    def _state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        yield from model.named_parameters(remove_duplicate=True)
        yield from model.named_buffers(remove_duplicate=True)

    def restore(self) -> None:
        """Put back every parameter and buffer, bit for bit, and every eps."""
        with uninterrupted(), torch.no_grad():
            for name, tensor in self._state(self.model):
                tensor.copy_(self.tensors[name])
            self.normalization_constants.restore()


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Run a block that must leave ``model``'s buffers as they were (a forward that updates a counter or
    statistics of its own even in eval mode): they are put back, bit for bit, however it ends."""
    saved = {name: tensor.detach().clone() for name, tensor in model.named_buffers(remove_duplicate=True)}
    try:
        yield
    finally:
        with uninterrupted(), torch.no_grad():
            for name, tensor in model.named_buffers(remove_duplicate=True):
                if name in saved:
                    tensor.copy_(saved[name])


@contextmanager
def evaluating(model: nn.Module) -> Iterator[ModelFlags]:
    """Run a block with ``model`` in eval mode; its modes and ``requires_grad`` flags are restored after."""
    flags = ModelFlags(model)
    try:
        model.eval()  # inside the try: a Ctrl-C halfway through it still restores every module's mode
        yield flags
    finally:
        flags.restore()


@contextmanager
def guarded(model: nn.Module) -> Iterator[ModelSnapshot]:
    """Run a block on ``model`` in eval mode; on any exception restore every tensor.

    Flags (mode, ``requires_grad``) are restored in every case. Exceptions
    include ``KeyboardInterrupt``.
    """
    snapshot = ModelSnapshot(model)
    with evaluating(model):
        try:
            yield snapshot
        except BaseException:
            snapshot.restore()
            raise


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
