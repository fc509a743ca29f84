"""magicinit with DistributedDataParallel: initialize over every rank's shard, then train.

Each process initializes the same model on its own shard of scikit-learn's
digits (statistics reduced over all processes; every rank ends with the same
weights, checked below), wraps it in DDP and trains a few SGD steps::

    pip install -c constraints.txt -e ".[demo]"
    torchrun --standalone --nproc-per-node 2 examples/ddp_train.py

On GPUs, the same script runs with the nccl backend (``--backend nccl``), one
GPU per process.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.distributed as dist

# Imported before init_process_group on purpose: this module's functions take the default
# group as a default argument, evaluated at import. DDP imports it on first use; after
# init_process_group that pins the group for the life of the process, destroy_process_group
# cannot free it, and gloo's threads then meet interpreter shutdown (an occasional SIGABRT,
# "terminate called without an active exception").
import torch.distributed.nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import magicinit
from magicinit.tools.nets import plain_cnn
from magicinit.tools.readers import digits


def weight_checksum(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer, to compare the ranks' models."""
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)

    images, labels = digits()
    images = (images - images.mean()) / images.std()
    dataset = TensorDataset(images, labels)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler)

    torch.manual_seed(rank)  # different default weights on purpose: magicinit makes them agree
    model = plain_cnn(args.depth, 32, in_channels=1, classes=10).to(device)
    # Every rank passes its own shard (the first 4 batches of its loader); the statistics
    # are those of all shards, and the seed is shared, so the weights end identical.
    init_batches = [batch for _, batch in zip(range(4), loader)]
    report = magicinit.init_(model, init_batches, seed=0)
    checksums: list[str | None] = [None] * world
    dist.all_gather_object(checksums, weight_checksum(model))
    if rank == 0:
        print(report)
        print(f"weights after init_ on {world} ranks: {checksums} (identical: {len(set(checksums)) == 1})")
    assert len(set(checksums)) == 1, checksums

    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for batch_images, batch_labels in loader:
            loss = torch.nn.functional.cross_entropy(ddp(batch_images.to(device)), batch_labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if rank == 0 and (step % 20 == 0 or step == args.steps):
                print(f"step {step}: loss {loss.item():.3f}")
            if step == args.steps:
                break
        epoch += 1
    dist.all_gather_object(checksums, weight_checksum(model))
    if rank == 0:
        print(f"weights after {step} DDP steps identical on all ranks: {len(set(checksums)) == 1}")
    del ddp  # DDP holds the process group too: drop it so that destroy_process_group frees the group
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
