"""Turning what the user passes as ``data`` into one batch of model input.

A *batch* is a tensor, or a tuple/list/dict of batches (a DataLoader's
``(images, labels)`` pair, say). Non-tensor leaves are carried along
unchanged. All batches are concatenated along dimension 0, up to a cap on the
number of samples, into one batch that the method's passes then use or
split into chunks.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .errors import MagicInitError

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], Any]


def default_forward(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` on a batch: its first element if it is a tuple or list."""
    model_input = batch[0] if isinstance(batch, (tuple, list)) else batch
    return model(model_input)


def _rebuilt(container: tuple | list, items: list[Any]) -> tuple | list:
    """A tuple or list of ``container``'s own type holding ``items`` (a namedtuple stays that namedtuple)."""
    if hasattr(container, "_fields"):  # a namedtuple: its fields are positional arguments
        return type(container)(*items)
    try:
        return type(container)(items)
    except Exception:  # a subclass whose constructor takes something else
        return list(items) if isinstance(container, list) else tuple(items)


def map_tensors(fn: Callable[[Tensor], Any], batch: Batch) -> Batch:
    """``batch`` with ``fn`` applied to every tensor in it (nested tuple/list/dict, their subclasses and
    namedtuples keeping their type; other values kept)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, (tuple, list)):
        return _rebuilt(batch, [map_tensors(fn, item) for item in batch])
    if isinstance(batch, dict):
        return _rebuilt_dict(batch, {key: map_tensors(fn, value) for key, value in batch.items()})
    return batch


def _rebuilt_dict(container: dict, items: dict) -> dict:
    """A dict of ``container``'s own type holding ``items`` (a plain dict where its type cannot be built so)."""
    try:
        return type(container)(items)
    except Exception:
        return items


def cast_floating(batch: Batch, dtype: torch.dtype) -> Batch:
    """The batch with every floating tensor cast to ``dtype``."""
    return map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, batch)


def jitter_floating(batch: Batch, seed: int) -> Batch:
    """The batch with seeded Gaussian noise added to every floating tensor.

    The noise has each tensor's own standard deviation (or its mean magnitude,
    or 1, where that is zero), so the result is a different but plausible input.
    """

    def jitter(tensor: Tensor) -> Tensor:
        if not tensor.is_floating_point():
            return tensor
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64).to(tensor.device, tensor.dtype)
        size = float(tensor.double().std(correction=0)) if tensor.numel() > 1 else 0.0
        size = size or float(tensor.double().abs().mean()) or 1.0
        return tensor + size * noise

    return map_tensors(jitter, batch)


def floating_tensors(obj: Any) -> Iterator[Tensor]:
    """Yield every floating-point tensor inside ``obj`` (see ``all_tensors``)."""
    return (tensor for tensor in all_tensors(obj) if tensor.is_floating_point())


def all_tensors(obj: Any) -> Iterator[Tensor]:
    """Yield every tensor inside ``obj``: nested tuples, lists, dicts (Hugging Face's ``ModelOutput`` is
    one) and dataclass instances."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from all_tensors(item)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from all_tensors(value)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for item in dataclasses.fields(obj):
            yield from all_tensors(getattr(obj, item.name))


def batch_size(batch: Batch) -> int:
    """Number of samples in a batch: dimension 0 of its first tensor."""
    for tensor in all_tensors(batch):
        if tensor.dim() == 0:
            raise MagicInitError("data: a batch holds a 0-dimensional tensor; batches need a sample dimension 0")
        return tensor.shape[0]
    raise MagicInitError("data: a batch holds no tensor; pass tensors, or tuples/lists/dicts of tensors")


def split_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``start:stop`` of every tensor in the batch."""
    return map_tensors(lambda tensor: tensor[start:stop], batch)


def _concat(batches: list[Batch]) -> Batch:
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches, dim=0) if len(batches) > 1 else first
    if isinstance(first, (tuple, list)):
        return _rebuilt(first, [_concat([batch[i] for batch in batches]) for i in range(len(first))])
    if isinstance(first, dict):
        return _rebuilt_dict(first, {key: _concat([batch[key] for batch in batches]) for key in first})
    return first


def _check_finite(batch: Batch, index: int) -> None:
    if any(tensor.is_meta for tensor in all_tensors(batch)):
        raise MagicInitError(f"data: batch {index} is on the meta device and has no values; pass real init data")
    for tensor in floating_tensors(batch):
        if not bool(torch.isfinite(tensor).all()):
            raise MagicInitError(f"data: batch {index} contains NaN or Inf values; clean or filter the init data first")


def _is_one_batch(data: Any) -> bool:
    """Whether ``data`` is one batch rather than an iterable of batches.

    A tensor, a dict and a tuple holding a tensor are one batch. A list of tensors is a list of batches
    when the tensors could be batches of one input (the same shape past dimension 0 and the same dtype);
    otherwise, if they share dimension 0, it is one batch of several entries, as a DataLoader's
    ``next(iter(loader))`` gives ``[inputs, targets]``. A list of two or more tensors of one shape and
    dtype is both: it is taken as batches, with a warning.
    """
    if isinstance(data, (Tensor, dict)) or (isinstance(data, tuple) and any(isinstance(t, Tensor) for t in data)):
        return True
    if not isinstance(data, list) or not data or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in data):
        return False
    alike = all(t.shape[1:] == data[0].shape[1:] and t.dtype == data[0].dtype for t in data)
    same_samples = all(t.shape[0] == data[0].shape[0] for t in data)
    if alike:
        if len(data) > 1 and same_samples:
            warnings.warn(
                f"magicinit: data is a list of {len(data)} tensors of one shape {tuple(data[0].shape)}; they are "
                "taken as that many batches of one input. For one batch of several inputs, pass a tuple",
                UserWarning,
                stacklevel=4,
            )
        return False
    return same_samples


def gather_batch(
    data: Tensor | Iterable[Batch],
    max_samples: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Batch:
    """Concatenate ``data`` into one batch of at most ``max_samples`` samples.

    ``data`` is a batch or an iterable of batches (a DataLoader). Floating
    tensors move to the model's ``device`` and ``dtype``, other tensors to its
    device. NaN or Inf anywhere in the used data is an error.
    """
    if max_samples < 1:
        raise MagicInitError(f"samples={max_samples}: the sample cap must be at least 1")
    batches: Iterable[Batch] = [data] if _is_one_batch(data) else data
    collected: list[Batch] = []
    count = 0
    try:
        iterator = iter(batches)
    except TypeError:
        raise MagicInitError(
            f"data: expected a tensor or an iterable of batches (a DataLoader), got {type(data).__name__}"
        ) from None
    for index, batch in enumerate(iterator):
        size = batch_size(batch)
        if size == 0:
            continue
        batch = split_batch(batch, 0, max_samples - count)
        _check_finite(batch, index)
        collected.append(batch)
        count += min(size, max_samples - count)
        if count >= max_samples:
            break
    if not collected:
        raise MagicInitError("data: no samples (the iterable was empty); pass at least one non-empty batch")
    joined = _concat(collected)

    def to_model(tensor: Tensor) -> Tensor:
        moved = tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device=device)
        return moved.clone() if moved.is_inference() else moved  # made in inference mode: no autograd

    return map_tensors(to_model, joined)
