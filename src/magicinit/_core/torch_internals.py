"""Every place where magicinit relies on something torch does not document as public.

A torch upgrade that changes one of these assumptions should fail here, in one
named function, and in its test (``tests/test_torch_internals.py`` has one test
per function below), not somewhere deep inside Part 1 or Part 2.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn.modules import module as module_internals
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def is_vectorization_refusal(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps) is ``torch.func.vmap``'s refusal to vectorize an operation.

    Torch raises a plain ``RuntimeError`` (or ``ValueError``) without a type of
    its own for this; its message names vmap, a batching rule, functorch or a
    batched tensor, or (a batched tensor read outside torch: ``.numpy()``) says the
    tensor has no storage. Assumption: that wording (tested on an operation without a
    batching rule, on data-dependent control flow and on ``.numpy()``).
    """
    text = " ".join(str(e) for e in (error, _root_cause(error))).lower()
    words = ("vmap", "batching rule", "functorch", "batched tensor", "doesn't have storage")
    return any(word in text for word in words)


def root_cause_name(error: BaseException) -> str:
    """The type name of the innermost error ``error`` was raised from (for a report's reason)."""
    return type(_root_cause(error)).__name__


def parametrization_cache_enabled() -> bool:
    """Whether the block runs inside ``torch.nn.utils.parametrize.cached()``, so that a parametrized
    weight is computed once and the same tensor is returned on every access.

    Assumption: ``parametrize`` keeps that state in its module variable ``_cache_enabled``
    (true, or a positive count, inside ``cached()``).
    """
    return bool(parametrize._cache_enabled)


def pruned_tensor_name(hook: BasePruningMethod) -> str:
    """The attribute a pruning hook (``torch.nn.utils.prune``) recomputes: ``"weight"`` for
    ``prune.l1_unstructured(module, "weight", ...)``; its parameter is that name with ``_orig``.

    Assumption: the hook keeps the name in its attribute ``_tensor_name``.
    """
    return hook._tensor_name


def forward_pre_hooks(module: nn.Module) -> list[Callable[..., Any]]:
    """The forward pre-hooks registered on ``module`` itself (the user's, and torch's own for
    ``weight_norm``, ``prune`` and ``spectral_norm``, which are instances of their classes), in
    registration order; global hooks are not among them.

    Assumption: ``nn.Module`` keeps them in the dict ``_forward_pre_hooks``.
    """
    return list(module._forward_pre_hooks.values())


def forward_hooks(module: nn.Module) -> list[Callable[..., Any]]:
    """The forward hooks registered on ``module`` itself, in registration order; global hooks are
    not among them.

    Assumption: ``nn.Module`` keeps them in the dict ``_forward_hooks``.
    """
    return list(module._forward_hooks.values())


def without_torch_function_dispatch(func: types.FunctionType) -> types.FunctionType:
    """A copy of the Python function ``func`` whose own ``__torch_function__`` dispatch is off, so that
    a ``TorchFunctionMode`` active while the copy runs sees the torch calls inside it one by one.

    A torch function written in Python (``F.multi_head_attention_forward``) first asks
    ``has_torch_function`` whether to hand the whole call to a mode; the copy reads a
    ``has_torch_function`` that says no. Assumption: ``func`` looks that name up in its
    module's globals at call time (not through a closure or an import inside the function).
    """
    namespace = dict(func.__globals__)
    namespace["has_torch_function"] = lambda *_: False
    copy = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    return copy


def view_base(tensor: Tensor) -> Tensor | None:
    """The tensor ``tensor`` is a view of, or None if it owns its storage.

    Assumption: ``Tensor._base`` is set on every view (slicing, ``.t()``,
    ``.view``) to the tensor it was taken from, and is None otherwise.
    """
    return tensor._base


COMPILED_ORIGINAL_ATTRIBUTE = "_orig_mod"  # where a torch.compile'd model keeps the module it wraps


def compiled_original(module: object) -> nn.Module | None:
    """The module a ``torch.compile``'d model wraps (whose parameters it shares), or None if ``module`` is
    not one.

    Assumption: ``torch.compile(module)`` returns an ``OptimizedModule`` that keeps the original as
    ``_orig_mod``.
    """
    original = getattr(module, COMPILED_ORIGINAL_ATTRIBUTE, None)
    return original if isinstance(original, nn.Module) else None


def name_in_compiled_original(name: str) -> str | None:
    """The qualified name that a module or parameter a ``torch.compile``'d model lists as ``name``
    (``_orig_mod.backbone``) has in the module it wraps (``backbone``; ``""`` for ``_orig_mod`` itself), or
    None if ``name`` is not under that prefix.

    Assumption: the compiled model keeps the original as the submodule ``_orig_mod`` (see
    ``compiled_original``), so that its ``named_modules`` and ``named_parameters`` give the original's names
    under that prefix.
    """
    if name == COMPILED_ORIGINAL_ATTRIBUTE:
        return ""
    prefix = COMPILED_ORIGINAL_ATTRIBUTE + "."
    return name.removeprefix(prefix) if name.startswith(prefix) else None


def global_forward_hooks() -> list[Callable[..., Any]]:
    """The global forward hooks and forward pre-hooks (``torch.nn.modules.module.register_module_forward_hook``
    and ``register_module_forward_pre_hook``), which run around every module's call, in registration order.

    Assumption: ``torch.nn.modules.module`` keeps them in the dicts ``_global_forward_pre_hooks`` and
    ``_global_forward_hooks``.
    """
    return [*module_internals._global_forward_pre_hooks.values(), *module_internals._global_forward_hooks.values()]


REENTRANT_CHECKPOINT = "CheckpointFunction"  # the autograd.Function of torch.utils.checkpoint's reentrant variant


class _PlainCheckpoint:
    """Stands in for ``torch.utils.checkpoint.CheckpointFunction`` while ``reentrant_checkpoints_run_plainly``
    is active: on a thread that asked for it, the checkpointed function runs as a plain call (in the grad
    mode around it); on any other thread, the real ``CheckpointFunction`` runs."""

    original: Any = None  # the real CheckpointFunction, while the stand-in is installed
    installs = 0  # blocks (on any thread) that need the stand-in installed
    lock = threading.Lock()
    local = threading.local()  # .depth: blocks active on this thread

    @classmethod
    def apply(cls, function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
        if getattr(cls.local, "depth", 0):
            return function(*args)
        return cls.original.apply(function, preserve_rng_state, *args)


@contextmanager
def reentrant_checkpoints_run_plainly() -> Iterator[None]:
    """Run a block in which ``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True)`` (and
    ``checkpoint_sequential``) called on this thread gives ``function(*args)`` as a plain call: the same
    values, and a graph that ``torch.autograd.grad`` can go through (the reentrant variant runs ``function``
    without gradients and allows only ``.backward()``). Other threads keep real checkpointing.

    Assumption: the reentrant variant calls ``CheckpointFunction.apply(function, preserve_rng_state, *args)``,
    looking up ``CheckpointFunction`` in ``torch.utils.checkpoint``'s globals at call time.
    """
    checkpoint_module = torch.utils.checkpoint
    with _PlainCheckpoint.lock:
        if getattr(checkpoint_module, REENTRANT_CHECKPOINT) is not _PlainCheckpoint:
            _PlainCheckpoint.original = getattr(checkpoint_module, REENTRANT_CHECKPOINT)
            setattr(checkpoint_module, REENTRANT_CHECKPOINT, _PlainCheckpoint)
        _PlainCheckpoint.installs += 1
    _PlainCheckpoint.local.depth = getattr(_PlainCheckpoint.local, "depth", 0) + 1
    try:
        yield
    finally:
        _PlainCheckpoint.local.depth -= 1
        with _PlainCheckpoint.lock:
            _PlainCheckpoint.installs -= 1
            if _PlainCheckpoint.installs == 0 and _PlainCheckpoint.original is not None:
                setattr(checkpoint_module, REENTRANT_CHECKPOINT, _PlainCheckpoint.original)
