"""Turning what the user passes as ``data`` into one batch of model input.

A *batch* is a tensor, or a tuple/list/dict/dataclass of batches (a DataLoader's
``(images, labels)`` pair, say). Every tensor holds its samples along
``sample_dim`` (a 1-dimensional tensor, a vector of labels, along its only
dimension), all of them as many; a 0-dimensional tensor is not per sample. A list or tuple of
values that hold no tensor (a DataLoader's list of captions), one per sample,
is split and joined with the samples; other non-tensor values are carried
along unchanged (those of the first batch). All batches are concatenated, up
to a cap on the number of samples, into one batch with its samples along
dimension 0 (``gather_batch``), which the method's passes then use or split
into chunks; ``forward_in_data_layout`` hands the model each piece laid out
as the data was.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
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


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _dataclass_fields(value: Any) -> dict[str, Any]:
    """The values of a dataclass instance's fields, by name."""
    return {item.name: getattr(value, item.name) for item in dataclasses.fields(value)}


def _rebuilt_dataclass(container: Any, items: dict[str, Any]) -> Any:
    """A shallow copy of the dataclass instance ``container`` with its fields set to ``items`` (frozen ones
    too; ``__init__`` and ``__post_init__`` are not run again)."""
    rebuilt = copy.copy(container)
    for name, item in items.items():
        object.__setattr__(rebuilt, name, item)
    return rebuilt


def map_tensors(fn: Callable[[Tensor], Any], batch: Batch) -> Batch:
    """``batch`` with ``fn`` applied to every tensor in it (nested tuple/list/dict/dataclass, their subclasses
    and namedtuples keeping their type; other values kept)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, (tuple, list)):
        return _rebuilt(batch, [map_tensors(fn, item) for item in batch])
    if isinstance(batch, dict):
        return _rebuilt_dict(batch, {key: map_tensors(fn, value) for key, value in batch.items()})
    if _is_dataclass_instance(batch):
        return _rebuilt_dataclass(batch, {k: map_tensors(fn, v) for k, v in _dataclass_fields(batch).items()})
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
    return (tensor for _, tensor in tensor_entries(obj))


def tensor_entries(obj: Any, where: str = "") -> Iterator[tuple[str, Tensor]]:
    """Yield every tensor inside ``obj`` (as ``all_tensors``, in the same order) with the entry that holds
    it, written as indexing from ``obj`` (``where`` prefixed): ``[0]``, ``['mask']``, ``.image``."""
    if isinstance(obj, Tensor):
        yield where, obj
    elif isinstance(obj, (tuple, list)):
        for index, item in enumerate(obj):
            yield from tensor_entries(item, f"{where}[{index}]")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensor_entries(value, f"{where}[{key!r}]")
    elif _is_dataclass_instance(obj):
        for name, value in _dataclass_fields(obj).items():
            yield from tensor_entries(value, f"{where}.{name}")


def tensor_sample_dim(tensor: Tensor, sample_dim: int) -> int | None:
    """The dimension of ``tensor`` that indexes samples when the data's is ``sample_dim``: that one, or the
    only dimension of a 1-dimensional tensor (a vector of labels); None for a 0-dimensional tensor (not
    per sample)."""
    if tensor.dim() == 0:
        return None
    if tensor.dim() == 1:
        return 0
    if sample_dim >= tensor.dim():
        raise MagicInitError(
            f"sample_dim={sample_dim}: the data holds a tensor of shape {tuple(tensor.shape)}, which has no "
            f"dimension {sample_dim}; pass as sample_dim the dimension of each input tensor that indexes samples"
        )
    return sample_dim


def samples_first(batch: Batch, sample_dim: int) -> Batch:
    """``batch`` with every tensor's sample dimension (``tensor_sample_dim``) moved to dimension 0."""
    if sample_dim == 0:
        return batch

    def moved(tensor: Tensor) -> Tensor:
        dim = tensor_sample_dim(tensor, sample_dim)
        return tensor if not dim else tensor.movedim(dim, 0)

    return map_tensors(moved, batch)


def forward_in_data_layout(forward: ForwardFn, sample_dim: int) -> ForwardFn:
    """``forward`` taking batches with their samples along dimension 0 (as ``gather_batch`` lays them out):
    it hands the model each tensor with its samples back along ``sample_dim`` (contiguous), as the data had
    them."""
    if sample_dim == 0:
        return forward

    def as_given(tensor: Tensor) -> Tensor:
        dim = tensor_sample_dim(tensor, sample_dim)
        return tensor if not dim else tensor.movedim(0, dim).contiguous()

    def call(model: nn.Module, batch: Batch) -> Any:
        return forward(model, map_tensors(as_given, batch))

    return call


def batch_size(batch: Batch) -> int:
    """Number of samples in a batch laid out by ``gather_batch`` (samples along dimension 0): dimension 0
    of its first tensor that is not 0-dimensional."""
    for tensor in all_tensors(batch):
        if tensor.dim() > 0:
            return tensor.shape[0]
    raise MagicInitError(
        "data: a batch holds no tensor with a sample dimension; pass tensors (torch.from_numpy(array) for a "
        "numpy array), or tuples/lists/dicts/dataclasses of tensors"
    )


def _is_per_sample_list(value: Any, count: int) -> bool:
    """Whether ``value`` is a list or tuple (not a namedtuple) of ``count`` values, one per sample, none
    holding a tensor: a DataLoader's list of captions or file names."""
    return (
        isinstance(value, (list, tuple))
        and not hasattr(value, "_fields")
        and len(value) == count
        and not any(True for _ in all_tensors(list(value)))
    )


def split_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``start:stop`` of a batch laid out by ``gather_batch``: of every tensor that is not
    0-dimensional, and of every list of one value per sample (``_is_per_sample_list``)."""
    return _samples_of(batch, lambda tensor: tensor[start:stop], lambda values: values[start:stop])


def select_batch(batch: Batch, indices: Sequence[int]) -> Batch:
    """Samples ``indices`` (in that order) of a batch laid out by ``gather_batch``, as ``split_batch`` takes
    a range of them."""
    rows = list(indices)
    return _samples_of(
        batch,
        lambda tensor: tensor[torch.tensor(rows, dtype=torch.long, device=tensor.device)],
        lambda values: type(values)([values[i] for i in rows]),  # a list or a plain tuple (not a namedtuple)
    )


def _samples_of(batch: Batch, of_tensor: Callable[[Tensor], Tensor], of_list: Callable[[Any], Any]) -> Batch:
    """The batch with ``of_tensor`` applied to every tensor that is not 0-dimensional and ``of_list`` to
    every list of one value per sample: some of its samples (``split_batch``, ``select_batch``)."""
    count = batch_size(batch)

    def take(value: Any) -> Any:
        if isinstance(value, Tensor):
            return of_tensor(value) if value.dim() > 0 else value
        if _is_per_sample_list(value, count):
            return of_list(value)
        if isinstance(value, (tuple, list)):
            return _rebuilt(value, [take(item) for item in value])
        if isinstance(value, dict):
            return _rebuilt_dict(value, {key: take(item) for key, item in value.items()})
        if _is_dataclass_instance(value):
            return _rebuilt_dataclass(value, {name: take(item) for name, item in _dataclass_fields(value).items()})
        return value

    return take(batch)


def _concat(batches: list[Batch], counts: list[int], indices: list[int], where: str = "") -> Batch:
    """The batches (samples along dimension 0, ``counts`` samples each, ``indices`` their places in the
    data) joined into one; ``where`` names the entry for an error (``['caption']``, ``[0]``)."""
    first = batches[0]
    entry = f"data entry {where}" if where else "data"
    if isinstance(first, Tensor):
        if not all(isinstance(batch, Tensor) for batch in batches):
            raise MagicInitError(f"{entry} is a tensor in the first batch but not in all batches; pass batches alike")
        if first.dim() == 0 or len(batches) == 1:
            return first
        for index, batch in zip(indices, batches):
            if batch.dim() != first.dim() or batch.shape[1:] != first.shape[1:]:
                raise MagicInitError(
                    f"{entry} has shape {tuple(first.shape)} in the first batch but {tuple(batch.shape)} in "
                    f"batch {index} (samples first): batches are joined along their samples, so their other "
                    "dimensions must agree; pad every batch to one length (a collate_fn with a fixed length), "
                    "or pass one batch"
                )
        return torch.cat(batches, dim=0)
    per_sample = [_is_per_sample_list(batch, count) for batch, count in zip(batches, counts)]
    if all(per_sample):
        joined = [item for batch in batches for item in batch]
        return joined if isinstance(first, list) else tuple(joined)
    if any(per_sample) and isinstance(first, (tuple, list)) and not any(True for _ in all_tensors(first)):
        other = per_sample.index(False)
        raise MagicInitError(
            f"{entry} holds one value per sample in batch {indices[per_sample.index(True)]} but not in batch "
            f"{indices[other]} ({len(batches[other])} values, {counts[other]} samples); give each batch one "
            "value per sample, or none"
        )
    if isinstance(first, (tuple, list)):
        if not all(isinstance(batch, (tuple, list)) and len(batch) == len(first) for batch in batches):
            raise MagicInitError(
                f"{entry} is a {type(first).__name__} of {len(first)} entries in the first batch but not in every "
                "batch; pass batches of one structure"
            )
        return _rebuilt(
            first,
            [_concat([batch[i] for batch in batches], counts, indices, f"{where}[{i}]") for i in range(len(first))],
        )
    if isinstance(first, dict):
        if not all(isinstance(batch, dict) and batch.keys() == first.keys() for batch in batches):
            raise MagicInitError(
                f"{entry} is a dict with keys {sorted(map(str, first))} in the first batch but not in every batch; "
                "pass batches with the same keys"
            )
        return _rebuilt_dict(
            first,
            {key: _concat([batch[key] for batch in batches], counts, indices, f"{where}[{key!r}]") for key in first},
        )
    if _is_dataclass_instance(first):
        if not all(type(batch) is type(first) for batch in batches):
            raise MagicInitError(
                f"{entry} is a {type(first).__name__} in the first batch but not in every batch; pass batches of "
                "one structure"
            )
        fields = [_dataclass_fields(batch) for batch in batches]
        return _rebuilt_dataclass(
            first,
            {
                name: _concat([values[name] for values in fields], counts, indices, f"{where}.{name}")
                for name in fields[0]
            },
        )
    return first


def _check_finite(batch: Batch, index: int) -> None:
    if any(tensor.is_meta for tensor in all_tensors(batch)):
        raise MagicInitError(f"data: batch {index} is on the meta device and has no values; pass real init data")
    for tensor in floating_tensors(batch):
        if not bool(torch.isfinite(tensor).all()):
            raise MagicInitError(f"data: batch {index} contains NaN or Inf values; clean or filter the init data first")


def _is_one_batch(data: Any, sample_dim: int = 0) -> bool:
    """Whether ``data`` is one batch rather than an iterable of batches.

    A tensor, a dict and a tuple holding a tensor are one batch. A list of tensors is a list of batches
    when the tensors could be batches of one input (the same shape apart from the sample dimension, and
    the same dtype); otherwise, if they have as many samples, it is one batch of several entries, as a
    DataLoader's ``next(iter(loader))`` gives ``[inputs, targets]``. A list of two or more tensors of one
    shape and dtype is both: it is taken as batches, with a warning.
    """
    if isinstance(data, (Tensor, dict)) or (isinstance(data, tuple) and any(isinstance(t, Tensor) for t in data)):
        return True
    if _is_dataclass_instance(data):
        return True
    if not isinstance(data, list) or not data or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in data):
        return False
    first = samples_first(data[0], sample_dim)
    laid_out = [samples_first(t, sample_dim) for t in data]
    alike = all(t.shape[1:] == first.shape[1:] and t.dtype == first.dtype for t in laid_out)
    same_samples = all(t.shape[0] == first.shape[0] for t in laid_out)
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


def _check_sample_counts(batch: Batch, sample_dim: int, index: int) -> None:
    """Every tensor of batch ``index`` that is not 0-dimensional must hold as many samples along its sample
    dimension (``tensor_sample_dim``) as the first: batches are split and joined along it, and a tensor
    laid out otherwise (a list of sequences of their own lengths, a key padding mask of shape ``(N, L)``
    with ``sample_dim=1``, a graph's edge list) would be cut along another dimension or joined with other
    samples' pieces."""
    first: tuple[str, Tensor, int] | None = None
    for where, tensor in tensor_entries(batch):
        dim = tensor_sample_dim(tensor, sample_dim)
        if dim is None:
            continue
        if first is None:
            first = (where, tensor, tensor.shape[dim])
            continue
        first_where, first_tensor, count = first
        if tensor.shape[dim] != count:
            layout = (
                f"lay every tensor of the data out with its samples along dimension {sample_dim} (a vector of "
                "labels along its only one)"
                if sample_dim != 0
                else "stack or pad per-sample tensors into one tensor per entry (a collate_fn)"
            )
            raise MagicInitError(
                f"data: batch {index} holds at {where or 'its top'} a tensor of shape {tuple(tensor.shape)} whose "
                f"dimension {dim} has {tensor.shape[dim]} entries, where its first tensor (at "
                f"{first_where or 'its top'}, shape {tuple(first_tensor.shape)}) has {count} samples "
                f"(sample_dim={sample_dim}): every tensor of a batch is split and joined along its samples, so all "
                f"must hold as many; {layout}, keep what is not per sample out of the data (build it in "
                "forward=lambda model, batch: ...), or pass the model's input alone"
            )


def _cast_to_model(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``tensor`` on ``device``, in ``dtype`` if floating, and not an inference tensor; values that are
    finite but overflow ``dtype`` are an error naming the data (not the first layer that meets them)."""
    if not tensor.is_floating_point():
        moved = tensor.to(device=device)
    else:
        moved = tensor.to(device=device, dtype=dtype)
        if dtype != tensor.dtype and not bool(torch.isfinite(moved).all()):
            largest = float(tensor.detach().abs().max())
            raise MagicInitError(
                f"data: a tensor of shape {tuple(tensor.shape)} holds values up to {largest:.3g}, which overflow "
                f"{dtype}, the model's dtype (largest finite value {torch.finfo(dtype).max:.3g}), when cast to "
                "it; standardize the data (zero mean, unit variance) or scale it down"
            )
    return moved.clone() if moved.is_inference() else moved  # made in inference mode: no autograd


def gather_batch(
    data: Tensor | Iterable[Batch],
    max_samples: int,
    device: torch.device,
    dtype: torch.dtype,
    sample_dim: int = 0,
) -> Batch:
    """Concatenate ``data`` into one batch of at most ``max_samples`` samples, with its samples along
    dimension 0.

    ``data`` is a batch or an iterable of batches (a DataLoader), each with
    its samples along ``sample_dim`` (see the module text). Floating tensors
    move to the model's ``device`` and ``dtype``, other tensors to its device.
    NaN or Inf anywhere in the used data, or values the model's dtype cannot
    hold, is an error.
    """
    if max_samples < 1:
        raise MagicInitError(f"samples={max_samples}: the sample cap must be at least 1")
    batches: Iterable[Batch] = [data] if _is_one_batch(data, sample_dim) else data
    collected: list[Batch] = []
    counts: list[int] = []
    indices: list[int] = []
    try:
        iterator = iter(batches)
    except TypeError:
        raise MagicInitError(
            f"data: expected a tensor or an iterable of batches (a DataLoader), got {type(data).__name__}"
        ) from None
    for index, given in enumerate(iterator):
        _check_sample_counts(given, sample_dim, index)
        batch = samples_first(given, sample_dim)
        size = batch_size(batch)
        if size == 0:
            continue
        batch = split_batch(batch, 0, max_samples - sum(counts))
        _check_finite(batch, index)
        collected.append(batch)
        indices.append(index)
        counts.append(min(size, max_samples - sum(counts)))
        if sum(counts) >= max_samples:
            break
    if not collected:
        raise MagicInitError("data: no samples (the iterable was empty); pass at least one non-empty batch")
    return map_tensors(lambda tensor: _cast_to_model(tensor, device, dtype), _concat(collected, counts, indices))
