"""The Python side of ``bench/gpu.sh``: two of its steps, and the one table of all of them.

Subcommands (run from the repository root):

``table OUT``
    Reads what ``bench/gpu.sh`` left in ``OUT`` (``steps.tsv``: one line per step with its exit status,
    wall seconds and time limit; each step's log and JSON) and prints one markdown table (step, status,
    wall seconds, key figures), also written to ``OUT/gpu_table.md`` under a ``## bench/gpu.sh`` heading,
    ready to paste into ``bench/RESULTS.md`` (or ``--results bench/RESULTS.md`` replaces that section).
    Exit status 1 where a step did not pass (failed, timed out, ran zero tests, skipped its tests).

``distributed --json PATH``
    Two processes, rendezvous on 127.0.0.1. The backend: ``nccl`` where there are 2 GPUs or more (rank r
    on ``cuda:r``); on one GPU ``gloo``, both ranks on ``cuda:0`` (NCCL refuses two ranks on one GPU:
    "Duplicate GPU detected", ``ncclInvalidUsage``, since NCCL 2.5). Under ``nccl`` the checks of
    ``tests/test_distributed.py`` run as they are (models on the CPU, every reduction of magicinit over
    NCCL on the rank's GPU); under both backends a check with the model and the data on the GPU: both
    parts leave bit-identical ranks, Part 1 over the shards equals one process on their union, and the
    rates are equalized.

``gram --json PATH``
    The Gram route's decision on this device. The per-sample gradient norms of a convolution or linear map
    with few positions against its channels can go through the Gram matrix of each sample's positions
    (``norms.gram_norms``, float64) instead of forming each sample's gradient; ``norms.gram_is_cheaper``
    takes that route on the CPU only. Here, on the device, ``rescale_`` (Part 2 alone, after Part 1) runs
    with the gradients formed everywhere (the library's route off the CPU) and with the Gram route wherever
    the CPU's count makes it cheaper, interleaved, ``--repeats`` times each: the whole call's seconds; the
    seconds spent in the norm computation (another run each, synchronized per site); the sites on the Gram
    route; how far the two routes' weights differ. The verdict compares the norm computations.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import socket
import statistics
import sys
import time
import traceback
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
HEADING = "## bench/gpu.sh"
TIMEOUT_CODES = {124, 137}  # timeout(1): TERM after the limit, KILL after --kill-after
NO_TESTS = 5  # pytest's exit status when no test was collected (or all were deselected)


# --- the table -------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One line of ``steps.tsv``: what ``bench/gpu.sh`` ran and how it ended."""

    name: str
    rc: int | None  # None: not run (no time left)
    seconds: float
    limit: float
    log: str


def read_steps(out: Path) -> list[Step]:
    """The steps of ``out/steps.tsv`` (name, exit status or ``-``, wall seconds, limit seconds, log path)."""
    steps = []
    path = out / "steps.tsv"
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, rc, seconds, limit, log = (line.split("\t") + ["", "", "", ""])[:5]
        steps.append(
            Step(name, None if rc in ("", "-") else int(rc), float(seconds or 0), float(limit or 0), log.strip())
        )
    return steps


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 1) -> str:
    """The last non-empty lines of a log (for a failed step's cell)."""
    try:
        text = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " / ".join(text[-lines:])


def markdown_rows(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``text`` whose header starts with ``| first_header |``, as
    dicts by header name."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        if line.startswith(f"| {first_header} |"):
            header = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows = []
            for row in lines[start + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, (cell.strip() for cell in row.strip().strip("|").split("|")))))
            return rows
    return []


def figures_cuda_tests(out: Path, step: Step) -> tuple[str | None, str]:
    """(a problem that makes the step fail, the figures) from the JUnit XML of pytest."""
    xml = out / "cuda_tests.xml"
    if not xml.exists():
        return "no test report", _tail(out / step.log)
    try:
        root = ElementTree.parse(xml).getroot()
    except ElementTree.ParseError as error:
        return "unreadable test report", str(error)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    names = sorted({case.get("name", "?") for suite in suites for case in suite.iter("testcase")})
    figures = (
        f"{passed} passed, {count['failures']} failed, {count['errors']} errors, {count['skipped']} skipped: "
        + ", ".join(names)
    )
    if count["tests"] == 0:
        return "0 tests selected", figures
    if count["skipped"]:
        return "tests skipped (CUDA not seen by pytest?)", figures
    if passed != count["tests"]:
        return "tests failed", figures
    return None, figures


def figures_speed(out: Path, step: Step) -> tuple[str | None, str]:
    """Per depth: Part 1 / forward, Part 2 / (fwd+bwd) and its passes, rescale_ / (fwd+bwd), peak memory;
    kmeans over gaussian per width; parsed from bench/speed.py's printed tables."""
    try:
        text = (out / step.log).read_text(errors="replace")
    except OSError:
        return "no log", ""
    rows = markdown_rows(text, "depth")
    if not rows:
        return "no table in the output", _tail(out / step.log)
    parts = []
    for row in rows:
        parts.append(
            f"depth {row.get('depth')}: Part 1/fwd {row.get('Part 1 / forward', '-')} "
            f"({row.get('≤ 1.3?', '-')}), Part 2/(fwd+bwd) {row.get('Part 2 / (fwd+bwd)', '-')}, "
            f"Part 2 calls (passes) {row.get('Part 2 model calls (passes)', '-')}, "
            f"rescale_/(fwd+bwd) {row.get('rescale_ / (fwd+bwd)', '-')}, "
            f"memory init_/(fwd+bwd) {row.get('peak memory: init_ / (fwd+bwd)', '-')}"
        )
    kmeans = [row for row in markdown_rows(text, "width") if row.get("sampler") == "kmeans"]
    if kmeans:
        median = "Part 1 time / gaussian's (median)"
        parts.append(
            "kmeans/gaussian Part 1: " + ", ".join(f"{row.get(median)} (width {row.get('width')})" for row in kmeans)
        )
    return None, "; ".join(parts)


def figures_zoo(out: Path, step: Step) -> tuple[str | None, str]:
    """Per model: init_ and forward seconds, their ratio, the rate spread, how the norms were computed."""
    data = _read_json(out / "zoo.json")
    if data is None:
        return "no zoo.json", _tail(out / step.log)
    parts = []
    for row in data.get("rows", []):
        init, forward = row.get("init_seconds"), row.get("forward_seconds")
        seconds = "" if init is None or forward is None else f"{init:.2f} s / {1000 * forward:.1f} ms = "
        before, after = row.get("spread_before"), row.get("spread_after")
        spread = "-" if before is None else f"{before:.3g} → {'-' if after is None else f'{after:.3g}'}"
        parts.append(
            f"{row['name']}: init_/fwd {seconds}{row['init_over_forward']:.0f}×, spread {spread}, "
            f"{row.get('rate_way', '-')}" + (f", {len(row['warnings'])} warning(s)" if row.get("warnings") else "")
        )
    if not parts:
        return "no model rows", ""
    return None, "; ".join(parts)


def figures_distributed(out: Path, step: Step) -> tuple[str | None, str]:
    """The backend, the devices, and each check's result and seconds."""
    data = _read_json(out / "distributed.json")
    if data is None:
        return "no distributed.json", _tail(out / step.log)
    checks = ", ".join(
        f"{check['name']} {'ok' if check['ok'] else 'FAILED'} {check['seconds']:.1f} s" for check in data["checks"]
    )
    figures = (
        f"{data['world']} processes, {data['backend']} ({data['why']}), devices {', '.join(data['devices'])}"
        + (f", NCCL {data['nccl']}" if data.get("nccl") else "")
        + f": {checks or 'no check finished'}"
    )
    if data.get("error"):
        figures += f"; error: {data['error']}"
    return (None if data.get("ok") else "a check failed"), figures


def figures_gram(out: Path, step: Step) -> tuple[str | None, str]:
    """Per model: rescale_ seconds with the gradients formed and through the Gram matrix, the norm
    computation's seconds of each, the sites on the Gram route, the results' difference; and the verdict."""
    data = _read_json(out / "gram.json")
    if data is None:
        return "no gram.json", _tail(out / step.log)
    parts = []
    for row in data.get("models", []):
        parts.append(
            f"{row['name']}: rescale_ {row['formed_seconds']:.3f} s formed vs {row['gram_seconds']:.3f} s Gram "
            f"(×{row['gram_seconds'] / row['formed_seconds']:.2f}); norms {row['formed_norm_seconds']:.3f} vs "
            f"{row['gram_norm_seconds']:.3f} s (×{row['gram_norm_seconds'] / row['formed_norm_seconds']:.2f}); "
            f"Gram route at {row['gram_sites']} of {row['sites']} sites; {row['rate_way']}; "
            f"weights differ by {row['weight_difference']:.1e}"
        )
    if data.get("verdict"):
        parts.append(data["verdict"])
    if not parts:
        return "no model rows", ""
    return None, "; ".join(parts)


FIGURES: dict[str, Callable[[Path, Step], tuple[str | None, str]]] = {
    "cuda tests": figures_cuda_tests,
    "speed.py": figures_speed,
    "zoo": figures_zoo,
    "distributed": figures_distributed,
    "gram route": figures_gram,
}


def cell(text: str) -> str:
    """Text for a markdown table cell: no pipes, no line breaks."""
    return text.replace("|", "/").replace("\n", " ").strip() or "-"


def step_row(out: Path, step: Step) -> tuple[bool, list[str]]:
    """(whether the step passed, its table cells)."""
    figures_of = FIGURES.get(step.name)
    problem, figures = None, ""
    if figures_of is not None:
        try:
            problem, figures = figures_of(out, step)
        except Exception as error:  # a figure that cannot be read must not hide the others
            problem, figures = "figures unreadable", f"{type(error).__name__}: {error}"
    if step.rc is None:
        status = "not run (no time left)"
    elif step.rc in TIMEOUT_CODES:
        status = f"timeout (limit {step.limit:.0f} s)"
    elif step.rc == NO_TESTS and step.name == "cuda tests":
        status = "failed (0 tests selected)"
    elif step.rc != 0:
        status = f"failed (exit {step.rc})"
    elif problem is not None:
        status = f"failed ({problem})"
    else:
        status = "ok"
    if status != "ok" and not figures:
        figures = _tail(out / step.log) if step.log else ""
    return status == "ok", [step.name, status, f"{step.seconds:.1f}", cell(figures)]


def build_table(out: Path) -> tuple[bool, str]:
    """(whether every step passed, the section: heading, machine line, table)."""
    steps = read_steps(out)
    lines = ["| step | status | wall s | key figures |", "|---|---|---|---|"]
    passed = bool(steps)
    for step in steps:
        ok, cells = step_row(out, step)
        passed = passed and ok
        lines.append("| " + " | ".join(cells) + " |")
    if not steps:
        lines.append("| - | failed (no steps.tsv) | - | - |")
    machine = out / "machine.txt"
    about = machine.read_text().strip().splitlines() if machine.exists() else []
    total = sum(step.seconds for step in steps)
    preface = [
        f"Run of `bash bench/gpu.sh` on {time.strftime('%Y-%m-%d')}"
        + (f", {'; '.join(line.strip() for line in about if line.strip())}" if about else "")
        + f"; steps {total:.0f} s in all.",
    ]
    return passed, "\n".join([HEADING, "", *preface, "", *lines]) + "\n"


def table_main(args: argparse.Namespace) -> int:
    passed, section = build_table(args.out)
    print(section, end="")
    (args.out / "gpu_table.md").write_text(section)
    if args.results is not None:
        sys.path.insert(0, str(BENCH))
        from results_file import replace_section

        replace_section(args.results, HEADING, section + "\n")
    return 0 if passed else 1


# --- the two-process check -------------------------------------------------------------------------------

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _checksum(model: Any) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_cuda_model(rank: int, world: int) -> None:
    """The model and each rank's shard on this rank's GPU (the CPU without one: ``--allow-cpu``): Part 1 over
    the shards equals one process on their union; both parts leave bit-identical ranks with equalized rates
    (as tests/test_distributed.py on the CPU)."""
    import torch
    import torch.distributed as dist

    import magicinit
    from magicinit.tools.nets import plain_cnn

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    sizes = (24, 40)
    union = torch.randn(sum(sizes), 3, 8, 8, generator=torch.Generator().manual_seed(7)).to(device)
    shard = union.split(sizes)[rank]

    def model() -> torch.nn.Module:
        torch.manual_seed(3)
        return plain_cnn(5, 8, in_channels=3, classes=5).to(device)

    def same_everywhere(value: object) -> None:
        gathered: list[object] = [None] * world
        dist.all_gather_object(gathered, value)
        assert all(item == gathered[0] for item in gathered), gathered

    for sampler in ("gaussian", "kmeans"):
        ours = model()
        magicinit.init_(ours, shard, sampler=sampler, between=False, seed=0)
        same_everywhere(_checksum(ours))
        if rank == 0 and sampler == "gaussian":  # kmeans draws its seeds from each rank's data: identical ranks only
            alone = model()
            magicinit.init_(alone, union, sampler=sampler, between=False, seed=0, process_group=None)
            for (key, value), expected in zip(ours.state_dict().items(), alone.state_dict().values()):
                change = float((value - expected).norm() / expected.norm().clamp_min(1e-12))
                assert change < 1e-4, (sampler, key, change)
    ours = model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = magicinit.init_(ours, shard, seed=0, rate_precision=0.03)
    same_everywhere(_checksum(ours))
    same_everywhere(report.to_dict() | {"seconds": None})
    assert all(p.device == device for p in ours.parameters())
    assert report.rate_spread_before > 3 and report.rate_spread_after < 1.15, report.rate_spread_after


def _checks(backend: str) -> list[tuple[str, Callable[[int, int], None]]]:
    """The checks to run, in order: tests/test_distributed.py's under nccl, then the CUDA-model one."""
    checks: list[tuple[str, Callable[[int, int], None]]] = []
    if backend == "nccl":
        sys.path.insert(0, str(TESTS))
        import test_distributed as tests

        checks += [
            ("test part1 = union", tests._check_part1_equals_one_process_on_the_union),
            ("test both parts bit-identical", tests._check_both_parts_leave_bit_identical_ranks),
            ("test errors reach every rank", tests._check_errors_reach_every_rank),
        ]
    checks.append(("CUDA model and data", _check_cuda_model))
    return checks


def _rank(rank: int, world: int, port: int, backend: str, folder: str) -> None:
    """One process: join the group on its GPU, run every check, write what happened to ``folder``."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(TESTS))
    torch.set_num_threads(1 if os.environ.get("OMP_NUM_THREADS") == "1" else 2)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    results = []
    record = Path(folder) / f"rank{rank}.json"
    try:
        for name, check in _checks(backend):
            started = time.perf_counter()
            try:
                check(rank, world)
            except BaseException:
                results.append({"name": name, "ok": False, "seconds": time.perf_counter() - started})
                record.write_text(json.dumps({"checks": results, "error": traceback.format_exc()}))
                raise
            results.append({"name": name, "ok": True, "seconds": time.perf_counter() - started})
            record.write_text(json.dumps({"checks": results, "error": None}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def distributed_main(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    summary: dict[str, Any] = {"world": WORLD, "gpus": gpus, "checks": [], "ok": False, "error": None}
    if gpus == 0 and args.allow_cpu:  # a smoke test of this driver without a GPU: gloo, the CPU
        summary.update(backend="gloo", why="no GPU (--allow-cpu)", devices=["cpu"] * WORLD, nccl=None)
    elif gpus == 0:
        summary.update(backend="-", why="no GPU", devices=[], error="CUDA is not available")
        args.json.write_text(json.dumps(summary, indent=1))
        print(summary["error"])
        return 1
    backend, why = (args.backend, "asked for") if gpus else ("gloo", summary["why"])
    if backend == "auto":
        if gpus >= WORLD and dist.is_nccl_available():
            backend, why = "nccl", f"one GPU per rank of {gpus}"
        else:
            backend = "gloo"
            why = "1 GPU: NCCL needs one GPU per rank" if gpus < WORLD else "NCCL not built in"
    if gpus:
        summary.update(
            backend=backend,
            why=why,
            devices=[f"cuda:{rank % gpus}" for rank in range(WORLD)],
            nccl=".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else None,
        )
    print(f"{WORLD} processes, backend {backend} ({why}), devices {summary['devices']}, NCCL {summary['nccl']}")
    folder = args.json.parent / "distributed_ranks"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("rank*.json"):
        old.unlink()
    context = mp.start_processes(
        _rank, args=(WORLD, _free_port(), backend, str(folder)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + args.deadline_s
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                summary["error"] = f"did not finish within {args.deadline_s:.0f} s"
                break
        else:
            summary["ok"] = True
    except mp.ProcessRaisedException as error:
        summary["error"] = str(error).strip().splitlines()[-1]
    except mp.ProcessExitedException as error:
        summary["error"] = str(error)
    ranks = [_read_json(folder / f"rank{rank}.json") or {"checks": [], "error": None} for rank in range(WORLD)]
    summary["checks"] = ranks[0]["checks"]  # rank 0 compares with one process alone: its times are the longer
    for rank, data in enumerate(ranks):
        if data["error"]:
            print(f"rank {rank}:\n{data['error']}")
            if summary["error"] is None or "Connection closed" in summary["error"]:
                summary["error"] = f"rank {rank}: " + data["error"].strip().splitlines()[-1]
    summary["ok"] = summary["ok"] and all(check["ok"] for data in ranks for check in data["checks"])
    for check in summary["checks"]:
        print(f"{check['name']}: {'ok' if check['ok'] else 'FAILED'} ({check['seconds']:.1f} s)")
    args.json.write_text(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


# --- the Gram route's decision ---------------------------------------------------------------------------

ROUTES = ("formed", "gram")  # never through the Gram matrix; through it wherever the CPU's count says it is cheaper


@contextlib.contextmanager
def norm_route(route: str, decisions: dict[str, bool] | None = None) -> Iterator[None]:
    """Within: the per-sample gradient norms of every site computed by ``route``: ``formed`` (each sample's
    gradient formed, as the library does off the CPU) or ``gram`` (the Gram matrix of its positions wherever
    ``norms.gram_is_cheaper`` says so on a CPU, whatever the device). With ``decisions``, every site's norm
    computation is timed instead (the device synchronized before and after; the seconds summed under the key
    ``""``) and whether it took the Gram route recorded by the site's name."""
    import torch

    from magicinit._core.rates import from_activations, norms
    from magicinit._core.rates.from_activations import FromActivations
    from results_file import synchronize

    original_decide, original_norms = norms.gram_is_cheaper, FromActivations._site_norms
    current: list[str] = []
    seconds = [0.0]

    def decide(positions: int, fan_in: int, outputs: int, device: Any) -> bool:
        chosen = route == "gram" and original_decide(positions, fan_in, outputs, torch.device("cpu"))
        if decisions is not None and current:
            decisions[current[-1]] = chosen
        return chosen

    def timed_norms(self: Any, record: Any, grad: Any) -> None:
        current[:] = [record.name]
        synchronize(grad.device)
        started = time.perf_counter()
        try:
            original_norms(self, record, grad)
        finally:
            synchronize(grad.device)
            seconds[0] += time.perf_counter() - started

    from_activations.gram_is_cheaper = decide
    if decisions is not None:
        FromActivations._site_norms = timed_norms
    try:
        yield
    finally:
        from_activations.gram_is_cheaper = original_decide
        FromActivations._site_norms = original_norms
        if decisions is not None:
            decisions[""] = seconds[0]


def library_route(device: Any) -> str:
    """The route the library takes on ``device`` where the Gram matrix is cheaper by the count (a layer of 4
    positions, 512 channels in and out, 3 x 3 kernels)."""
    from magicinit._core.rates import norms

    return "gram" if norms.gram_is_cheaper(4, 512 * 9, 512, device) else "formed"


def gram_main(args: argparse.Namespace) -> int:
    import torch

    import magicinit

    sys.path.insert(0, str(BENCH))
    from results_file import synchronize
    from zoo import RATE_WAYS, build

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available")
        return 1
    device = torch.device(args.device)
    inputs = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
    chosen = library_route(device)

    def rescale(model: torch.nn.Module, route: str, decisions: dict[str, Any] | None = None) -> tuple[float, Any]:
        with norm_route(route, decisions), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            synchronize(device)
            started = time.perf_counter()
            report = magicinit.rescale_(model, inputs, seed=0, across_normalization=True)
            synchronize(device)
        return time.perf_counter() - started, report

    print(f"device {device}: the library's route where the Gram matrix is cheaper by the count: {chosen}")
    started_all = time.perf_counter()
    rows = []
    for name in args.models:
        base = build(name, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            magicinit.init_(base, inputs, between=False, seed=0)  # Part 1: rescale_ meets what init_'s Part 2 does
        for route in ROUTES:  # warm-up: kernels, cuBLAS handles, float64 paths
            rescale(copy.deepcopy(base), route)
        times: dict[str, list[float]] = {route: [] for route in ROUTES}
        norm_times: dict[str, list[float]] = {route: [] for route in ROUTES}
        decisions: dict[str, dict[str, Any]] = {}
        results: dict[str, Any] = {}
        for _ in range(args.repeats):
            for route in ROUTES:
                times[route].append(rescale(copy.deepcopy(base), route)[0])
            for route in ROUTES:  # the norm computation alone, synchronized per site
                decisions[route] = {}
                results[route] = copy.deepcopy(base)
                report = rescale(results[route], route, decisions[route])[1]
                norm_times[route].append(decisions[route].pop(""))
            if time.perf_counter() - started_all > args.budget_s:
                break
        difference = max(
            float((a - b).double().norm() / b.double().norm().clamp_min(1e-12))
            for a, b in zip(results["gram"].state_dict().values(), results["formed"].state_dict().values())
            if a.is_floating_point()
        )
        row = {
            "name": name,
            "repeats": len(times["formed"]),
            **{f"{route}_seconds": statistics.median(times[route]) for route in ROUTES},
            **{f"{route}_norm_seconds": statistics.median(norm_times[route]) for route in ROUTES},
            "sites": len(decisions["gram"]),
            "gram_sites": sum(decisions["gram"].values()),
            "rate_way": next((way for note in report.notes for way in RATE_WAYS if f"samples; {way}" in note), "-"),
            "weight_difference": difference,
        }
        rows.append(row)
        print(
            f"{name}: rescale_ formed {row['formed_seconds']:.3f} s, Gram {row['gram_seconds']:.3f} s; norm "
            f"computation formed {row['formed_norm_seconds']:.3f} s, Gram {row['gram_norm_seconds']:.3f} s "
            f"(medians of {row['repeats']}); Gram route at {row['gram_sites']} of {row['sites']} sites; "
            f"{row['rate_way']}; the two routes' weights differ by {difference:.1e}",
            flush=True,
        )
    measured = [row for row in rows if row["gram_sites"]]
    if not measured:
        verdict = "no site can take the Gram route on these models: nothing to decide"
    else:
        gain = math.prod(row["formed_norm_seconds"] / row["gram_norm_seconds"] for row in measured) ** (
            1 / len(measured)
        )
        verdict = (
            f"on {device.type} the Gram route computes the norms {gain:.2f}× as fast as forming the gradients "
            f"(geometric mean over {len(measured)} model(s)); the library takes: {chosen}"
        )
        if chosen == "formed" and gain > 1.1:
            verdict += "; allowing the Gram route here would pay (norms.gram_is_cheaper)"
        elif chosen == "formed":
            verdict += "; keeping it on the CPU only is right here"
    print(verdict)
    data = {"device": str(device), "library_route": chosen, "models": rows, "verdict": verdict}
    if device.type == "cuda":
        data["gpu"] = torch.cuda.get_device_name(device)
    args.json.write_text(json.dumps(data, indent=1))
    return 0


# --- the command line ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("table", help="the table of a bench/gpu.sh run")
    table.add_argument("out", type=Path, help="the folder bench/gpu.sh wrote ($OUT)")
    table.add_argument("--results", type=Path, default=None, help="also replace its '## bench/gpu.sh' section")
    distributed = commands.add_parser("distributed", help="the two-process check on the GPU(s)")
    distributed.add_argument("--json", type=Path, required=True)
    distributed.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto")
    distributed.add_argument("--deadline-s", type=float, default=85.0, help="the processes are killed after this")
    distributed.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # smoke test: no GPU
    gram = commands.add_parser("gram", help="the Gram route's decision timed on the device")
    gram.add_argument("--json", type=Path, required=True)
    gram.add_argument("--models", nargs="+", default=["resnet18", "vgg11"])
    gram.add_argument("--repeats", type=int, default=3)
    gram.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    gram.add_argument("--budget-s", type=float, default=30.0, help="fewer repeats once this much time is spent")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return {"table": table_main, "distributed": distributed_main, "gram": gram_main}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
