"""Several processes (torch.distributed, gloo on loopback): shared statistics, identical weights.

Each test spawns 2 or 3 CPU processes that rendezvous on 127.0.0.1 and run
the checks themselves; an assertion in any rank fails the test. Every test is
bounded in time: the processes are killed after ``DEADLINE_S``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import magicinit
from conftest import plain_cnn, recording_later_rounds, relative_change
from magicinit import MagicInitError

DEADLINE_S = 240
SHARD_SIZES = {2: (24, 40), 3: (9, 30, 17)}  # unequal on purpose


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, check: Callable[[int, int], None], errors: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        check(rank, world)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    except BaseException:
        (errors / f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _run(check: Callable[[int, int], None], world: int, tmp_path: Path) -> None:
    """Run ``check(rank, world)`` in ``world`` processes; fail on any rank's exception or on timeout."""
    context = mp.start_processes(
        _worker, args=(world, _free_port(), check, tmp_path), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{world} processes did not finish within {DEADLINE_S} s")
    except mp.ProcessRaisedException:
        # the first rank to fail is the cause; the others then see "connection closed by peer"
        reports = sorted(tmp_path.glob("rank*.txt"), key=lambda f: "Connection closed" in f.read_text())
        pytest.fail("\n".join(f"{f.stem}:\n{f.read_text()}" for f in reports), pytrace=False)


def _data(world: int) -> list[torch.Tensor]:
    """The shards of one dataset (the same on every rank, each rank takes its own)."""
    everything = torch.randn(sum(SHARD_SIZES[world]), 3, 8, 8, generator=torch.Generator().manual_seed(7))
    return list(everything.split(SHARD_SIZES[world]))


def _model() -> torch.nn.Module:
    torch.manual_seed(3)
    return plain_cnn(5)


def _checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _same_on_every_rank(value: object, world: int) -> list[object]:
    gathered: list[object] = [None] * world
    dist.all_gather_object(gathered, value)
    assert all(item == gathered[0] for item in gathered), gathered
    return gathered


def _check_part1_equals_one_process_on_the_union(rank: int, world: int) -> None:
    shards = _data(world)
    union = torch.cat(shards)
    # pca and zca on all patches, so that they see exactly the union's (not random subsets of it);
    # their eigenvectors amplify the summation-order differences by about 10 (observed 2e-6 to 3e-5)
    tolerance = {"gaussian": 1e-5, "orthogonal": 1e-5, "pca": 1e-4, "zca": 1e-4}
    every_patch = {
        name: dataclasses.replace(magicinit.SAMPLERS[name], patches_per_filter=10**6) for name in ("pca", "zca")
    }
    for name in tolerance:
        sampler = every_patch.get(name, name)
        model = _model()
        report = magicinit.init_(model, shards[rank], sampler=sampler, between=False, seed=0)
        _same_on_every_rank(_checksum(model), world)
        assert report.settings["samples_used"] == len(union) and report.settings["processes"] == world
        if rank == 0:  # the same initialization in this process alone, on all the data
            alone = _model()
            magicinit.init_(alone, union, sampler=sampler, between=False, seed=0, process_group=None)
            for (key, value), expected in zip(model.state_dict().items(), alone.state_dict().values()):
                change = relative_change(value, expected)
                print(f"{world} ranks, {name}, {key}: {change:.1e}")
                assert change < tolerance[name], (name, key, change)
    # diagnose: channel statistics of all shards, the same report everywhere
    model = _model()
    diagnosis = magicinit.diagnose(model, shards[rank], rate_precision=0.1)
    _same_on_every_rank(diagnosis.to_dict(), world)
    if rank == 0:
        alone = magicinit.diagnose(model, union, rate_precision=0.1, process_group=None)
        for ours, theirs in zip(diagnosis.layers, alone.layers):
            assert ours.channel_std == pytest.approx(theirs.channel_std, rel=1e-5)
            assert ours.channel_mean == pytest.approx(theirs.channel_mean, rel=1e-4, abs=1e-6)
    # rates where two samples (both on the last rank) weigh most: the rounds after the second draw them more
    # often, over the ranks, which stop together; the rates agree with one process on the union within errors
    heavy = [shard.clone() for shard in shards]
    heavy[-1][:2] *= 8
    with recording_later_rounds() as later_rounds:
        diagnosis = magicinit.diagnose(model, heavy[rank], seed=4, rate_precision=0.02, rate_max_rounds=6)
    _same_on_every_rank(diagnosis.to_dict(), world)
    assert later_rounds  # every rank made the later rounds
    if rank == world - 1:  # its two large samples drawn several times in a round
        assert any(drawn.count(0) > 1 and drawn.count(1) > 1 for drawn in later_rounds), later_rounds
    if rank == 0:
        alone = magicinit.diagnose(
            model, torch.cat(heavy), seed=4, rate_precision=0.02, rate_max_rounds=6, process_group=None
        )
        for ours, theirs in zip(diagnosis.layers, alone.layers):
            # one process meets 0.02 within the budget (336-354 draws); the ranks draw other noise, and
            # reached 0.024 (a budget per rank instead of one for all left them at 0.033)
            assert theirs.rate_log_error <= 0.02 and ours.rate_log_error <= 0.025, (ours.name, ours.rate_log_error)
            assert abs(math.log(ours.rate / theirs.rate)) <= 3 * math.hypot(ours.rate_log_error, theirs.rate_log_error)


def _check_both_parts_leave_bit_identical_ranks(rank: int, world: int) -> None:
    shards = _data(world)
    for sampler in ("gaussian", "kmeans-full", "kmeans-reference", "patches", "pca"):
        model = _model()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            report = magicinit.init_(model, shards[rank], sampler=sampler, seed=0, rate_precision=0.03)
        _same_on_every_rank(_checksum(model), world)
        _same_on_every_rank(report.to_dict() | {"seconds": None, "between_seconds": None}, world)
        assert report.rate_spread_before > 3 and report.rate_spread_after < 1.15, (sampler, report.rate_spread_after)
        if rank == 0 and sampler == "gaussian":  # as well equalized as by one process on all the data
            alone = magicinit.init_(_model(), torch.cat(shards), seed=0, rate_precision=0.03, process_group=None)
            print(f"{world} ranks: rate spread {report.rate_spread_after:.3f}, alone {alone.rate_spread_after:.3f}")
            assert alone.rate_spread_after < 1.15
    model = _model()  # a trained model (here: the default init) rescaled over all shards
    rescaled = magicinit.rescale_(model, shards[rank], seed=1, rate_precision=0.03)
    _same_on_every_rank(_checksum(model), world)
    assert rescaled.output_change < 1e-4 and rescaled.rate_spread_after < 1.15
    # approximate mode: the operations treated as homogeneous, the rounds and the output change agree too
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.LocalResponseNorm(3),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 16, 4),
    )
    report = magicinit.init_(
        model, shards[rank], seed=0, rate_precision=0.05, scale_mode="approximate", across_normalization=True
    )
    _same_on_every_rank(_checksum(model), world)
    _same_on_every_rank(report.to_dict() | {"seconds": None, "between_seconds": None}, world)
    assert report.approximated and report.normalizations


def _check_errors_reach_every_rank(rank: int, world: int) -> None:
    model = _model()
    saved = _checksum(model)
    shard = torch.randn(0 if rank == 1 else 8, 3, 8, 8)
    expected = "no samples" if rank == 1 else r"rank\(s\) \[1\] of the process group failed before initializing"
    with pytest.raises(MagicInitError, match=expected):
        magicinit.init_(model, shard, seed=0)
    shard = torch.randn(8, 5 if rank == 1 else 3, 8, 8)  # rank 1's data has channels the model rejects
    expected = "model rejected the init data" if rank == 1 else r"rank\(s\) \[1\] of the process group failed"
    with pytest.raises(MagicInitError, match=expected):
        magicinit.diagnose(model, shard)
    with pytest.raises(MagicInitError, match="passed different seeds"):
        magicinit.init_(model, torch.randn(8, 3, 8, 8), seed=rank)
    # other options that differ: every rank names them, before any collective could wait (a sampler that
    # gathers patches on one rank only, or Part 2 on one rank only, used to hang until the group's timeout;
    # another beta left the ranks apart without a word)
    for options in ({"beta": 0.1 * rank}, {"between": rank == 0}, {"sampler": "pca" if rank else "gaussian"}):
        name = next(iter(options))
        named = rf"rank {rank} of the process group passed {name}=.* other values of {name}"
        with pytest.raises(MagicInitError, match=named):
            magicinit.init_(model, torch.randn(8, 3, 8, 8), seed=0, **options)
    # each rank's own cap on its samples may differ, and the same skip names in another order (a set's order
    # differs between processes) are the same names
    skip = {"0", "2"} if rank else ["2", "0"]
    magicinit.init_(_model(), torch.randn(8, 3, 8, 8), seed=0, samples=4 + rank, skip=skip, between=False)
    assert _checksum(model) == saved
    # an explicit group of all ranks, and seed=None (rank 0 draws the seed for all)
    group = dist.new_group(list(range(world)))
    magicinit.init_(model, torch.randn(8, 3, 8, 8), process_group=group, rate_precision=0.1)
    _same_on_every_rank(_checksum(model), world)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_part1_over_shards_equals_one_process_on_their_union(world: int, tmp_path: Path) -> None:
    _run(_check_part1_equals_one_process_on_the_union, world, tmp_path)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_both_parts_leave_every_rank_bit_identical(world: int, tmp_path: Path) -> None:
    _run(_check_both_parts_leave_bit_identical_ranks, world, tmp_path)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.slow
def test_a_rank_without_data_or_with_another_seed_fails_on_every_rank(tmp_path: Path) -> None:
    _run(_check_errors_reach_every_rank, 2, tmp_path)


def test_process_group_argument_is_checked() -> None:
    with pytest.raises(MagicInitError, match="process_group='world'"):
        magicinit.init_(_model(), torch.randn(8, 3, 8, 8), process_group="world")
    assert not dist.is_initialized()  # "default" without torch.distributed: this process alone
    magicinit.init_(_model(), torch.randn(8, 3, 8, 8), seed=0, between=False)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.slow
def test_torchrun_example_initializes_wraps_in_ddp_and_trains() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "ddp_train.py"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(example),
        "--steps",
        "5",
        "--depth",
        "5",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=DEADLINE_S, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "statistics over 2 processes" in done.stdout
    assert "(identical: True)" in done.stdout
    assert "weights after 5 DDP steps identical on all ranks: True" in done.stdout
