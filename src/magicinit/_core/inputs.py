"""Turning what the user passes as ``data`` into one batch of model input.

A *batch* is a tensor, or a tuple/list/dict of batches (a DataLoader's
``(images, labels)`` pair, say). Non-tensor leaves are carried along
unchanged. All batches are concatenated along dimension 0, up to a cap on the
number of samples, into one batch that the method's passes then use or
split into chunks.
"""

from __future__ import annotations

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


def map_tensors(fn: Callable[[Tensor], Any], batch: Batch) -> Batch:
    """``batch`` with ``fn`` applied to every tensor in it (nested tuple/list/dict; other values kept)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, (tuple, list)):
        mapped = [map_tensors(fn, item) for item in batch]
        return type(batch)(mapped) if isinstance(batch, list) else tuple(mapped)
    if isinstance(batch, dict):
        return {key: map_tensors(fn, value) for key, value in batch.items()}
    return batch


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
    """Yield every floating-point tensor inside ``obj`` (nested tuple/list/dict)."""
    return (tensor for tensor in all_tensors(obj) if tensor.is_floating_point())


def all_tensors(obj: Any) -> Iterator[Tensor]:
    """Yield every tensor inside ``obj`` (nested tuple/list/dict)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from all_tensors(item)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from all_tensors(value)


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
        items = [_concat([batch[i] for batch in batches]) for i in range(len(first))]
        return items if isinstance(first, list) else tuple(items)
    if isinstance(first, dict):
        return {key: _concat([batch[key] for batch in batches]) for key in first}
    return first


def _check_finite(batch: Batch, index: int) -> None:
    if any(tensor.is_meta for tensor in all_tensors(batch)):
        raise MagicInitError(
            f"data: batch {index} is on the meta device and has no values; pass real init data"
        )
    for tensor in floating_tensors(batch):
        if not bool(torch.isfinite(tensor).all()):
            raise MagicInitError(
                f"data: batch {index} contains NaN or Inf values; clean or filter the init data first"
            )


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
    if isinstance(data, (Tensor, dict)) or (isinstance(data, tuple) and any(isinstance(t, Tensor) for t in data)):
        batches: Iterable[Batch] = [data]
    else:
        batches = data
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
        if tensor.is_floating_point():
            return tensor.to(device=device, dtype=dtype)
        return tensor.to(device=device)

    return map_tensors(to_model, joined)
