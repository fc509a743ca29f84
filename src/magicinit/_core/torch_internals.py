"""Every place where magicinit relies on something torch does not document as public.

A torch upgrade that changes one of these assumptions should fail here, in one
named function, and in its test (``tests/test_torch_internals.py`` has one test
per function below), not somewhere deep inside Part 1 or Part 2.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
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
    batched tensor. Assumption: that wording (tested on an operation without a
    batching rule and on data-dependent control flow).
    """
    text = " ".join(str(e) for e in (error, _root_cause(error))).lower()
    return any(word in text for word in ("vmap", "batching rule", "functorch", "batched tensor"))


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


def compiled_original(module: object) -> nn.Module | None:
    """The module a ``torch.compile``'d model wraps (whose parameters it shares), or None if ``module`` is
    not one.

    Assumption: ``torch.compile(module)`` returns an ``OptimizedModule`` that keeps the original as
    ``_orig_mod``.
    """
    original = getattr(module, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else None
