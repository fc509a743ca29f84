"""Leaving the user's model as it was: snapshot, restore, mode and hook cleanup."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["ModelSnapshot", "guarded"]


class ModelSnapshot:
    """A copy of every parameter and buffer of a model, its modes and its ``requires_grad`` flags."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tensors = {name: t.detach().clone() for name, t in self._state(model)}
        self.training = {name: m.training for name, m in model.named_modules()}
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}

    @staticmethod
    def _state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        yield from model.named_parameters(remove_duplicate=True)
        yield from model.named_buffers(remove_duplicate=True)

    def restore_tensors(self) -> None:
        """Put back every parameter and buffer, bit for bit."""
        with torch.no_grad():
            for name, tensor in self._state(self.model):
                tensor.copy_(self.tensors[name])

    def restore_flags(self) -> None:
        """Put back train/eval mode and ``requires_grad`` of every module and parameter."""
        for name, module in self.model.named_modules():
            module.training = self.training[name]
        for name, param in self.model.named_parameters():
            param.requires_grad_(self.requires_grad[name])


@contextmanager
def guarded(model: nn.Module) -> Iterator[ModelSnapshot]:
    """Run a block on ``model`` in eval mode; on any exception restore every tensor.

    Flags (mode, ``requires_grad``) are restored in every case. Exceptions
    include ``KeyboardInterrupt``.
    """
    snapshot = ModelSnapshot(model)
    model.eval()
    try:
        yield snapshot
    except BaseException:
        snapshot.restore_tensors()
        raise
    finally:
        snapshot.restore_flags()
