"""Which operation made a rescaled model compute something else.

A rescaling that keeps the function changes every tensor of a forward pass by
a positive factor (one per tensor, or one per slice of a concatenation) and
leaves every boolean or integer result (comparisons, indices) as it was. When
the outputs changed all the same, the forward is run on the same input with
the weights before and after the rescaling, every call's results are
recorded, and the first call that broke this (its inputs only scaled, its
result not) is named: that operation's scale behaviour was read wrongly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .graph import ModuleScope, describe_scope, module_scope
from .inputs import Batch, ForwardFn, all_tensors
from .operations import OPERATIONS
from .sites import op_name

RECORD_MAX_BYTES = 512 * 2**20  # the results of one forward kept for the comparison; later calls are not recorded

# Relative deviation from proportional beyond which a result counts as changed, by dtype (rounding of one
# operation and its inputs' own rounding stays far below these).
_PROPORTIONAL_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}

Source = tuple[int, int]  # (call, result) that produced a tensor


@dataclass
class RecordedCall:
    """One call of a forward pass: the operation, the module it ran in, its tensor results (copies), and
    where each of its tensor arguments came from (an earlier call's result, or None: an input or a
    parameter)."""

    name: str
    where: str
    results: list[Tensor]
    sources: list[Source | None] = field(default_factory=list)

    def describe(self) -> str:
        """The operation and its module, as pin reasons name them: ``gt in 'head.score'``."""
        return f"{self.name}{self.where}"


class _Recorder(TorchFunctionMode):
    """Records every torch call of a forward pass (``RecordedCall``), up to ``RECORD_MAX_BYTES`` of results."""

    def __init__(self, scope: ModuleScope) -> None:
        super().__init__()
        self.scope = scope
        self.calls: list[RecordedCall] = []
        self.source_of: dict[int, Source] = {}
        self.alive: list[Tensor] = []  # keeps the ids of recorded results unique
        self.recorded_bytes = 0

    def __torch_function__(self, func, types_, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        sources = [self.source_of.get(id(t)) for t in all_tensors((args, kwargs))]
        out = func(*args, **kwargs)
        if self.recorded_bytes > RECORD_MAX_BYTES:
            return out
        results = [t for t in all_tensors(out) if isinstance(t, Tensor)]
        call = len(self.calls)
        where = describe_scope(self.scope.stack)
        copies = [t.detach().clone() for t in results]
        self.recorded_bytes += sum(t.numel() * t.element_size() for t in copies)
        self.calls.append(RecordedCall(op_name(func), where, copies, sources))
        for position, tensor in enumerate(results):
            self.source_of[id(tensor)] = (call, position)
            self.alive.append(tensor)
        return out


def record_calls(model: nn.Module, batch: Batch, forward: ForwardFn) -> list[RecordedCall]:
    """Every torch call of ``forward(model, batch)``, in order, with copies of its results (no grad)."""
    with module_scope(model) as scope, torch.no_grad():
        recorder = _Recorder(scope)
        with recorder:
            forward(model, batch)
    return recorder.calls


def _proportional(before: Tensor, after: Tensor, tolerance: float) -> bool:
    """Whether ``after`` is ``before`` times one positive factor, within ``tolerance`` (relative)."""
    if before.shape != after.shape:
        return False
    a, b = before.double().flatten(), after.double().flatten()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()))
    size = float(a @ a)
    if size == 0.0:
        return float(b @ b) == 0.0
    factor = float(a @ b) / size
    if factor <= 0:
        return False
    return float((b - factor * a).norm()) <= tolerance * float(b.norm())


def _changed_elements(before: Tensor, after: Tensor) -> str:
    if before.shape != after.shape:
        return f"its shape went from {tuple(before.shape)} to {tuple(after.shape)}"
    changed = int((before != after).sum())
    return f"{changed} of {before.numel()} elements changed"


SCALED, MIXED, CHANGED = "scaled", "mixed", "changed"  # what became of a result under the rescaling


def first_changed_operation(before: list[RecordedCall], after: list[RecordedCall], dtype: torch.dtype) -> str | None:
    """The first call whose result the rescaling changed beyond a positive factor (floating results) or at
    all (boolean and integer results) while its inputs were only scaled, described; None where no single
    call did (rounding, in an ill-conditioned forward).

    A concatenation of tensors scaled apart gives a result with several factors ("mixed"): it is not
    blamed, and no call reading it is blamed for a floating result; a boolean or integer result that
    changed there still is (a selection by value).
    """
    tolerance = _PROPORTIONAL_TOLERANCE.get(dtype, 1e-3)
    state: dict[Source, str] = {}
    for call, (old, new) in enumerate(zip(before, after)):
        if old.name != new.name or len(old.results) != len(new.results):
            return (
                f"the forward took another path: call {call} was {old.describe()} before the rescaling and "
                f"{new.describe()} after (a value read into Python, such as .item() or a tensor in an if, "
                "decided it)"
            )
        inputs = {state.get(source, SCALED) for source in new.sources if source is not None}
        for position, (a, b) in enumerate(zip(old.results, new.results)):
            floating = a.is_floating_point() or a.is_complex()
            if not floating:
                same = a.shape == b.shape and bool(torch.equal(a, b))
                if not same and CHANGED not in inputs:
                    return f"{new.describe()} ({_changed_elements(a, b)}: it selects or compares by value)"
                state[(call, position)] = SCALED if same else CHANGED
                continue
            if _proportional(a, b, tolerance):
                state[(call, position)] = SCALED
            elif CHANGED in inputs:
                state[(call, position)] = CHANGED
            elif MIXED in inputs or (OPERATIONS.get(new.name) and OPERATIONS[new.name].concatenation):
                state[(call, position)] = MIXED
            else:
                return f"{new.describe()} (its result changed beyond a factor while its inputs were only scaled)"
    if len(before) != len(after):
        return f"the forward made {len(before)} calls before the rescaling and {len(after)} after"
    return None


def changed_operation(
    model: nn.Module, batch: Batch, forward: ForwardFn, restore: Callable[[], Any], dtype: torch.dtype
) -> str | None:
    """The operation that makes ``model`` (rescaled) compute something else on ``batch`` than before;
    ``restore()`` puts the weights from before back (and is called in every case)."""
    try:
        after = record_calls(model, batch, forward)
    finally:
        restore()
    return first_changed_operation(record_calls(model, batch, forward), after, dtype)
