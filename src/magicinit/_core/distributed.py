"""Several processes: every statistic reduced over a ``torch.distributed`` process group.

When a model is trained with DistributedDataParallel (or FSDP), every process
holds its own shard of the data. ``init_``, ``rescale_`` and ``diagnose`` then
take their statistics over all shards and leave every process with the same
weights:

- channel moments (Part 1, diagnose) are gathered and merged exactly, in rank
  order, so ranks may hold different numbers of samples;
- the change-rate sums and their noise variances (Part 2) are summed;
- patch means and covariances (whitening) are merged exactly, k-means
  cluster sums and counts are summed;
- random draws that must agree (filters, k-means seeds) come from one
  generator whose seed all ranks share; draws over a rank's own data (patch
  subsets, the noise of Part 2) come from a generator forked per rank, so the
  shared one advances alike everywhere. Where a choice picks some rank's own
  data (the ``patches`` sampler, k-means seeds), rank 0's choice is broadcast.

The reductions run on the CPU for ``gloo`` and on the current CUDA device for
``nccl``; all ranks must call with the same model and options. A rank that
fails while gathering its data makes every rank raise, instead of leaving the
others waiting.

A sampler sees the processes as a ``SamplerCollective``: the few reductions a
data-driven sampler needs, which ``Collective`` provides.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, Protocol, Union, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import MagicInitError
from .stats import ChannelMoments

ProcessGroupArg = Union["dist.ProcessGroup", None, Literal["default"]]


@runtime_checkable
class SamplerCollective(Protocol):
    """The processes that initialize one model together, as a sampler sees them (``request.collective``).

    Every method is collective: each rank must call it, in the same order, with
    tensors of the same shape and dtype. A data-driven sampler reduces its
    statistics with these, so that every rank returns the same filters. The
    ``Collective`` of a ``torch.distributed`` process group satisfies it; so
    does any object with these five methods (a test double, another backend).

    Example:
        >>> def patch_count(request: magicinit.SamplerRequest, patches: torch.Tensor) -> int:
        ...     count = patches.shape[1]  # this rank's
        ...     return count if request.collective is None else request.collective.total(count)
    """

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over all ranks, in its own dtype and on its own device."""
        ...

    def total(self, value: int) -> int:
        """The sum of every rank's count ``value``."""
        ...

    def gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor``, in rank order, on ``tensor``'s device."""
        ...

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor``, on ``tensor``'s device (the choice every rank then takes)."""
        ...

    def fork(self, shared: torch.Generator) -> torch.Generator:
        """A generator of this rank's own, seeded from one draw of ``shared`` (which advances alike on all ranks)."""
        ...


class Collective:
    """The processes of one process group that initialize one model together (a ``SamplerCollective``, and more)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.root = dist.get_global_rank(group, 0)
        backend = str(dist.get_backend(group)).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over all ranks (reduced in float64), in its own dtype and device."""
        work = tensor.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=self.group)
        return work.to(tensor.device, tensor.dtype)

    def total(self, value: int) -> int:
        """The sum of every rank's count ``value``."""
        work = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=self.group)
        return int(work.item())

    def max(self, value: float) -> float:
        """The largest of every rank's ``value``."""
        work = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(work, op=dist.ReduceOp.MAX, group=self.group)
        return float(work.item())

    def gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (all of the same shape and dtype), in rank order, on ``tensor``'s device."""
        work = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(work) for _ in range(self.size)]
        dist.all_gather(parts, work, group=self.group)
        return [part.to(tensor.device) for part in parts]

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor`` (same shape and dtype on every rank), on ``tensor``'s device."""
        work = tensor.detach().to(self.device).contiguous().clone()
        dist.broadcast(work, src=self.root, group=self.group)
        return work.to(tensor.device)

    def merge_moments(self, local: ChannelMoments) -> ChannelMoments:
        """Exact moments of the union of every rank's values, merged in rank order (identical everywhere)."""
        count = local.mean.new_tensor([local.count]).double()
        packed = torch.cat([count, local.mean.double(), local.sum_sq_dev.double()])
        channels = local.mean.numel()
        merged: ChannelMoments | None = None
        for part in self.gather(packed):
            moments = ChannelMoments(int(part[0].item()), part[1 : 1 + channels], part[1 + channels :])
            if moments.count == 0:
                continue
            merged = moments if merged is None else merged.merge(moments)
        if merged is None:
            return local
        dtype = local.mean.dtype
        return ChannelMoments(merged.count, merged.mean.to(dtype), merged.sum_sq_dev.to(dtype))

    def fork(self, shared: torch.Generator) -> torch.Generator:
        """A generator of this rank's own, seeded from one draw of ``shared`` (which advances alike on all ranks)."""
        base = int(torch.randint(0, 2**62, (1,), generator=shared).item())
        return torch.Generator().manual_seed(base + self.rank)

    def shared_seed(self, seed: int | None) -> int:
        """The seed every rank uses: ``seed`` (which must be the same everywhere), or one drawn on rank 0."""
        mine = seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        agreed = int(self.broadcast(torch.tensor([mine], dtype=torch.int64)).item())
        given = self.gather(torch.tensor([-1 if seed is None else seed], dtype=torch.int64))
        if len({int(g.item()) for g in given}) > 1:
            raise MagicInitError(
                f"seed={seed!r} on rank {self.rank}, but the ranks of the process group passed different seeds "
                f"({', '.join(str(int(g.item())) for g in given)}); pass the same seed everywhere"
            )
        return agreed

    def same_options(self, options: dict[str, Any]) -> None:
        """Raise on every rank, naming them, if the ranks passed different ``options`` (by keyword, compared
        by their ``repr``): ranks that normalize to another ``beta`` end apart, and ranks that take other
        passes (``between``, a data-driven ``sampler``) wait on each other's collectives until the process
        group's timeout."""
        names = sorted(options)
        digests = torch.tensor([_digest(repr(options[name])) for name in names], dtype=torch.int64)
        every_rank = self.gather(digests)
        differing = [name for index, name in enumerate(names) if len({int(d[index]) for d in every_rank}) > 1]
        if differing:
            mine = ", ".join(f"{name}={options[name]!r}" for name in differing)
            raise MagicInitError(
                f"rank {self.rank} of the process group passed {mine}, and another rank other values of "
                f"{', '.join(differing)}; pass the same options on every rank (the data, samples, sample_dim, "
                "forward and progress may differ)"
            )

    def agree(self, error: MagicInitError | None) -> None:
        """Raise on every rank if any rank had ``error`` (so that no rank waits for the others)."""
        failed = self.gather(torch.tensor([0.0 if error is None else 1.0]))
        bad = [rank for rank, flag in enumerate(failed) if flag.item() > 0]
        if error is not None:
            raise error
        if bad:
            raise MagicInitError(
                f"rank(s) {bad} of the process group failed before initializing (their error says why: no "
                "samples, or data the model rejects); every rank needs init data the model accepts"
            )


def _digest(text: str) -> int:
    """A 64-bit digest of ``text``, the same in every process (``hash`` of a str is not)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def resolve_process_group(process_group: ProcessGroupArg) -> Collective | None:
    """The collective for ``process_group``: ``"default"`` is the default group when
    ``torch.distributed`` is initialized (else none); None means this process alone.
    A group of one process is the same as none."""
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "default":
            raise MagicInitError(
                f"process_group={process_group!r}: expected a torch.distributed ProcessGroup, None or 'default'"
            )
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
        assert group is not None  # torch.distributed is initialized
    elif dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        group = process_group
    else:
        raise MagicInitError(
            f"process_group: expected a torch.distributed ProcessGroup, None or 'default', got "
            f"{type(process_group).__name__}"
        )
    if dist.get_world_size(group) == 1:
        return None
    return Collective(group)
