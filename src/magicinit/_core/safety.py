"""Leaving the user's model as it was: snapshot and restore, modes, temporary hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


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
        for module, training in self.training.items():
            module.training = training
        for param, requires_grad in self.requires_grad.items():
            param.requires_grad_(requires_grad)


class ModelSnapshot:
    """A copy of every parameter and buffer of a model, and of every module's ``eps`` (which Part 2
    may change to compensate a normalization's input scale); its flags: ``ModelFlags``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tensors = {name: t.detach().clone() for name, t in self._state(model)}
        self.eps = {module: module.eps for module in model.modules() if hasattr(module, "eps")}

    @staticmethod
    def _state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        yield from model.named_parameters(remove_duplicate=True)
        yield from model.named_buffers(remove_duplicate=True)

    def restore(self) -> None:
        """Put back every parameter and buffer, bit for bit, and every ``eps``."""
        with torch.no_grad():
            for name, tensor in self._state(self.model):
                tensor.copy_(self.tensors[name])
        for module, eps in self.eps.items():
            module.eps = eps


@contextmanager
def evaluating(model: nn.Module) -> Iterator[ModelFlags]:
    """Run a block with ``model`` in eval mode; its modes and ``requires_grad`` flags are restored after."""
    flags = ModelFlags(model)
    model.eval()
    try:
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
        self.handles.append(module.register_forward_pre_hook(hook))

    def after(self, module: nn.Module, hook: Callable[[nn.Module, tuple[Any, ...], Any], Any]) -> None:
        """``hook(module, args, output)`` after every call of ``module`` (a non-None return replaces the output)."""
        self.handles.append(module.register_forward_hook(hook))


@contextmanager
def temporary_hooks() -> Iterator[Hooks]:
    """Hooks registered in the block are removed when it ends, however it ends."""
    hooks = Hooks()
    try:
        yield hooks
    finally:
        for handle in hooks.handles:
            handle.remove()
