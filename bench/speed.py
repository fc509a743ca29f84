"""Speed of magicinit's Part 1 against a plain forward pass, and against the ``lsuv`` package.

What it measures, for plain ReLU CNNs (no batch norm) of several depths on
random Gaussian inputs of shape (samples, 3, 32, 32), all in ONE run:

* Part 1 / forward: ``--pairs`` times, a ``torch.no_grad()`` forward over all
  samples and right after it the whole call
  ``magicinit.init_(model, x, between=False, seed=0)`` (setup included; the
  report's own ``seconds["within"]`` is shown beside it); the median of the
  per-pair ratios is reported. Pairing keeps one lucky forward on a noisy
  machine from skewing the ratio. The target is <= 1.3 at every depth;
* lsuv / forward: ``lsuv.lsuv_with_singlebatch`` (lsuv 0.3.0) with its default
  settings on a fresh copy of the model, over the same samples, each run right
  after a forward (median of ``--repeats`` pair ratios); lsuv / Part 1 is the
  quotient of the two medians;
* samplers: Part 1 with every sampler other than gaussian over Part 1 with
  gaussian timed right before it, on the ``--sampler-depth`` (16) plain CNN with
  the same samples, at every width of ``--sampler-widths`` (32 and 64; median of
  ``--repeats`` pairs); the target for kmeans is <= 5 at every width;
* rescale_: the whole call ``magicinit.rescale_(model, x2, seed=0)`` (Part 2 alone, on the model after
  Part 1, ``init_(between=False)``) over ``--part2-samples`` samples, divided by a forward+backward over the same
  samples
  timed right before it (median of ``--repeats`` pairs; the target at depth 16 is <= 4); then the
  rescaled model's change rates measured again by this script, independently of magicinit (one sample
  per draw, its own noise, plain autograd, ``--check-rounds`` draws per sample), and their largest
  deviation from their geometric mean (the target is <= 10 %);
* Part 2: ``report.seconds["between"]`` of ``magicinit.init_(model, x2, seed=0)`` over
  ``--part2-samples`` samples, divided by one forward+backward pass over those same
  samples (minimum times over ``--repeats``); the model calls Part 2 made (each a
  forward+backward over one chunk of samples, or a no-grad check), also counted in
  passes over the data; and the change-rate spread (max/min) before and after Part 2.
* Peak memory: the extra peak memory of the whole ``init_`` (Parts 1 and 2, over the
  ``--samples`` samples) over that of one forward+backward over the same samples. On
  CPU each is measured in three fresh processes and the median counts (peak RSS, /proc VmHWM, minus
  the RSS after building the model and the data); on CUDA by ``torch.cuda.max_memory_allocated``.

Every number in the table is a ratio of times taken in the same run, on the
same machine, so runs on different machines compare by their ratios only.

Run from the repository root (lsuv comes with the ``bench`` extra)::

    pip install -e ".[bench]" -c constraints.txt
    python bench/speed.py                 # depths 8 16 32, 7 pairs, 3 repeats
    python bench/speed.py --quick         # depths 8 16, 3 pairs, 1 repeat
    python bench/speed.py --no-lsuv --depths 8 --repeats 5

The exit status is 0 whether or not the target is met: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import inspect
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

import magicinit
from magicinit import Report
from magicinit.tools.nets import plain_cnn
from results_file import synchronize

try:
    import lsuv
except ImportError:  # the bench extra is not installed; --no-lsuv still works
    lsuv = None

Result = TypeVar("Result")

PART1_TARGET = 1.3  # Part 1 time / forward time, at every depth
IMAGE_SHAPE = (3, 32, 32)
CLASSES = 10
INPUT_SEED = 0
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# the measurements, by the names DepthResult.seconds keeps them under
FORWARD = "forward"  # torch.no_grad() forward over the samples, paired with each Part 1 run
LSUV_FORWARD = "lsuv forward"  # the forward timed just before each lsuv run
PART1_WALL = "part1 wall"  # the whole init_(..., between=False) call
PART1_WITHIN = "part1 within"  # its report.seconds["within"]
LSUV = "lsuv"  # lsuv.lsuv_with_singlebatch on a fresh copy
FORWARD_BACKWARD = "forward+backward"  # over the Part 2 samples
PART2_BETWEEN = "part2 between"  # report.seconds["between"] of a full init_ over the Part 2 samples
RESCALE_FORWARD_BACKWARD = "rescale fwd+bwd"  # forward+backward over the Part 2 samples, just before each rescale_
RESCALE = "rescale_"  # the whole rescale_ call over the Part 2 samples, on the model after Part 1
RESCALE_TARGET = 4.0  # rescale_ / (fwd+bwd) at depth 16
DEVIATION_TARGET = 0.10  # largest deviation of a re-measured rate from the geometric mean, after rescale_
PART1_CALLS = 2  # model calls of init_(between=False): the 2-sample probe and the one Part 1 pass
MEMORY_PROBES = ("forward+backward", "init_")
MEMORY_REPEATS = 3  # fresh processes per probe; the median counts (a process's baseline RSS varies by ~10 %)


@dataclass
class DepthResult:
    """What was measured at one depth: every repeat's seconds by measurement, Part 2's spreads, warnings."""

    depth: int
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    model_calls: dict[str, int] = field(default_factory=dict)  # calls of the model in one run, by measurement
    rate_spread_before: float | None = None
    rate_spread_after: float | None = None
    rescale_deviation: float | None = None  # after rescale_, measured by this script: max |rate / geomean - 1|
    peak_bytes: dict[str, int] = field(default_factory=dict)  # extra peak memory, by MEMORY_PROBES
    messages: set[str] = field(default_factory=set)

    def best(self, measurement: str) -> float | None:
        """The minimum over the repeats, or None if it was not measured."""
        times = self.seconds.get(measurement)
        return min(times) if times else None

    def paired_ratio(self, measurement: str, reference: str = FORWARD) -> float | None:
        """Median over the runs of ``measurement / reference``, each timed right after the other.

        Pairing makes the ratio robust on a noisy machine: one lucky forward
        cannot skew it, as it can a ratio of two minima taken minutes apart.
        """
        pairs = list(zip(self.seconds.get(measurement, []), self.seconds.get(reference, [])))
        return statistics.median(m / r for m, r in pairs) if pairs else None

    @property
    def part1_ratio(self) -> float:
        """Part 1's whole call over the plain forward timed just before it (median over pairs)."""
        ratio = self.paired_ratio(PART1_WALL)
        assert ratio is not None
        return ratio

    @property
    def meets_target(self) -> bool:
        return self.part1_ratio <= PART1_TARGET


def gaussian_inputs(samples: int, device: torch.device, seed: int = INPUT_SEED) -> Tensor:
    """``samples`` images of standard Gaussian noise, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, *IMAGE_SHAPE, generator=generator).to(device)


def timed(action: Callable[[], Result], device: torch.device) -> tuple[float, Result]:
    """Seconds ``action`` took (the device synchronized before reading the clock), and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = action()
    synchronize(device)
    return time.perf_counter() - start, result


def plain_forward(model: nn.Module, inputs: Tensor) -> Tensor:
    with torch.no_grad():
        return model(inputs)


def forward_backward(model: nn.Module, inputs: Tensor) -> None:
    model(inputs).sum().backward()


def count_model_calls(model: nn.Module) -> Callable[[], int]:
    """Counts the calls of ``model`` from now on; the returned function reads the count."""
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    model.register_forward_pre_hook(count)
    return lambda: calls[0]


def run_lsuv(model: nn.Module, inputs: Tensor, device: torch.device) -> None:
    assert lsuv is not None
    lsuv.lsuv_with_singlebatch(model, inputs, verbose=False, device=device)


def lsuv_defaults() -> str:
    """lsuv's default settings as ``name=value``, read from the installed package."""
    assert lsuv is not None
    parameters = inspect.signature(lsuv.lsuv_with_singlebatch).parameters.values()
    shown = ("needed_std", "std_tol", "max_attempts", "do_orthonorm")
    return ", ".join(f"{p.name}={p.default}" for p in parameters if p.name in shown)


def init_recording_warnings(result: DepthResult, model: nn.Module, inputs: Tensor, **options: Any) -> Report:
    """``magicinit.init_(model, inputs, seed=0, **options)`` on all of ``inputs``.

    Its warnings and the report's notes go to ``result.messages`` instead of the
    middle of the output (the same warning comes once per repeat).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = magicinit.init_(model, inputs, seed=0, samples=len(inputs), **options)
    result.messages.update(f"{w.category.__name__}: {w.message}" for w in caught)
    result.messages.update(f"note: {note}" for note in report.notes)
    return report


def measure_depth(
    depth: int, args: argparse.Namespace, inputs: Tensor, part2_inputs: Tensor, device: torch.device
) -> DepthResult:
    """All measurements at one depth, interleaved repeat by repeat."""
    model = build_model(depth, args, device)
    result = DepthResult(depth)
    plain_forward(model, inputs)  # warm-up: kernel selection and allocator growth
    for _ in range(args.pairs):
        result.seconds[FORWARD].append(timed(lambda: plain_forward(model, inputs), device)[0])
        part1_model = copy.deepcopy(model)
        part1_calls = count_model_calls(part1_model)
        seconds, report = timed(lambda: init_recording_warnings(result, part1_model, inputs, between=False), device)
        result.seconds[PART1_WALL].append(seconds)
        result.seconds[PART1_WITHIN].append(report.seconds["within"])
        result.model_calls[PART1_WALL] = part1_calls()
    within_only = copy.deepcopy(model)  # Part 1 only: what rescale_ is timed on, as Part 2 meets it in init_
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        magicinit.init_(within_only, part2_inputs, between=False, seed=0)
    for _ in range(args.repeats):
        if not args.no_lsuv:
            result.seconds[LSUV_FORWARD].append(timed(lambda: plain_forward(model, inputs), device)[0])
            lsuv_model = copy.deepcopy(model)
            lsuv_calls = count_model_calls(lsuv_model)
            torch.manual_seed(0)  # lsuv's orthogonal init draws from the global generator
            result.seconds[LSUV].append(timed(lambda: run_lsuv(lsuv_model, inputs, device), device)[0])
            result.model_calls[LSUV] = lsuv_calls()

        result.seconds[FORWARD_BACKWARD].append(timed(lambda: forward_backward(model, part2_inputs), device)[0])
        model.zero_grad(set_to_none=True)

        result.seconds[RESCALE_FORWARD_BACKWARD].append(timed(lambda: forward_backward(model, part2_inputs), device)[0])
        model.zero_grad(set_to_none=True)
        rescaled = copy.deepcopy(within_only)
        rescale_calls = count_model_calls(rescaled)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seconds, report = timed(lambda: magicinit.rescale_(rescaled, part2_inputs, seed=0), device)
        result.messages.update(f"rescale_ {w.category.__name__}: {w.message}" for w in caught)
        result.seconds[RESCALE].append(seconds)
        result.model_calls[RESCALE] = rescale_calls()

        part2_model = copy.deepcopy(model)
        part2_calls = count_model_calls(part2_model)
        report = init_recording_warnings(result, part2_model, part2_inputs)
        result.model_calls[PART2_BETWEEN] = part2_calls() - PART1_CALLS
        result.seconds[PART2_BETWEEN].append(report.seconds["between"])
        result.rate_spread_before = report.rate_spread_before
        result.rate_spread_after = report.rate_spread_after
    rates = independent_rates(rescaled, part2_inputs, args.check_rounds)
    mean_log = statistics.fmean(math.log(rate) for rate in rates.values())
    result.rescale_deviation = max(abs(rate / math.exp(mean_log) - 1) for rate in rates.values())
    result.peak_bytes = peak_memory(depth, args, device)
    return result


def independent_rates(model: nn.Module, inputs: Tensor, rounds: int, seed: int = 12345) -> dict[str, float]:
    """Every conv/linear layer's change rate ``sqrt(E||dL/dW||^2 / ||W||^2)``, measured here without magicinit:
    ``L = noise . model(sample)``, one sample per draw with noise from this script's own generator, plain
    autograd, ``rounds`` draws per sample, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}
    totals = {name: 0.0 for name in layers}
    model.eval()
    for _ in range(rounds):
        for index in range(len(inputs)):
            output = model(inputs[index : index + 1])
            noise = torch.randn(output.shape, generator=generator).to(output)
            grads = torch.autograd.grad(output, [m.weight for m in layers.values()], grad_outputs=noise)
            for name, grad in zip(layers, grads):
                totals[name] += float(grad.double().square().sum())
    draws = rounds * len(inputs)
    return {
        name: math.sqrt(totals[name] / draws / float(m.weight.detach().double().square().sum()))
        for name, m in layers.items()
    }


def build_model(depth: int, args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The depth's plain CNN, its default weights seeded by the depth."""
    torch.manual_seed(depth)
    return plain_cnn(depth, args.width, in_channels=IMAGE_SHAPE[0], classes=CLASSES).to(device)


def build_model_and_inputs(depth: int, args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Tensor]:
    """The depth's model and the ``--samples`` Gaussian inputs."""
    return build_model(depth, args, device), gaussian_inputs(args.samples, device)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run_probe(kind: str, model: nn.Module, inputs: Tensor) -> None:
    if kind == "forward+backward":
        forward_backward(model, inputs)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            magicinit.init_(model, inputs, seed=0, samples=len(inputs), rate_max_rounds=2)


def _peak_resident_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` of /proc/self/status. (Not ``ru_maxrss``: Linux
    carries that over exec from the forked parent, so a child of a large process reports the parent's.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_probe(kind: str, depth: int, args: argparse.Namespace) -> int:
    """In this (fresh) process: peak RSS during ``kind`` minus the RSS after building model and inputs."""
    model, inputs = build_model_and_inputs(depth, args, torch.device("cpu"))
    baseline = _resident_bytes()
    _run_probe(kind, model, inputs)
    return _peak_resident_bytes() - baseline


def peak_memory(depth: int, args: argparse.Namespace, device: torch.device) -> dict[str, int]:
    """Extra peak memory of each of ``MEMORY_PROBES`` (empty where it cannot be measured)."""
    peaks: dict[str, int] = {}
    if device.type == "cuda":
        model, inputs = build_model_and_inputs(depth, args, device)
        for kind in MEMORY_PROBES:
            torch.cuda.synchronize(device)
            baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            _run_probe(kind, copy.deepcopy(model), inputs)
            model.zero_grad(set_to_none=True)
            peaks[kind] = torch.cuda.max_memory_allocated(device) - baseline
        return peaks
    if not Path("/proc/self/statm").exists():
        return peaks
    for kind in MEMORY_PROBES:
        command = [
            sys.executable,
            __file__,
            "--memory-probe",
            kind,
            "--depths",
            str(depth),
            "--width",
            str(args.width),
            "--samples",
            str(args.samples),
            "--no-lsuv",
        ]
        if args.threads is not None:
            command += ["--threads", str(args.threads)]
        runs = [
            int(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            for _ in range(MEMORY_REPEATS)
        ]
        peaks[kind] = int(statistics.median(runs))
    return peaks


SAMPLER_TARGETS = {"kmeans": 5.0}  # init time / gaussian's, on the --sampler-depth plain CNN


def measure_samplers(
    args: argparse.Namespace, inputs: Tensor, device: torch.device, width: int
) -> dict[str, list[float]]:
    """Per sampler, the ratios of its Part 1 time to a gaussian Part 1 timed right before it, at ``width``."""
    torch.manual_seed(args.sampler_depth)
    model = plain_cnn(args.sampler_depth, width, in_channels=IMAGE_SHAPE[0], classes=CLASSES).to(device)
    ratios: dict[str, list[float]] = {name: [] for name in sorted(magicinit.SAMPLERS) if name != "gaussian"}
    for _ in range(args.repeats):
        for name in ratios:
            gaussian_seconds = timed(
                lambda: magicinit.init_(copy.deepcopy(model), inputs, between=False, seed=0), device
            )[0]
            sampler_seconds = timed(
                lambda: magicinit.init_(copy.deepcopy(model), inputs, between=False, seed=0, sampler=name), device
            )[0]
            ratios[name].append(sampler_seconds / gaussian_seconds)
    return ratios


def sampler_table(ratios_by_width: dict[int, dict[str, list[float]]]) -> str:
    lines = ["| width | sampler | Part 1 time / gaussian's (median) | every pair | target |", "|---|---|---|---|---|"]
    for width, ratios in ratios_by_width.items():
        for name, values in ratios.items():
            target = SAMPLER_TARGETS.get(name)
            verdict = (
                "-" if target is None else f"≤ {target}: {'PASS' if statistics.median(values) <= target else 'MISS'}"
            )
            pairs = "/".join(f"{v:.2f}" for v in values)
            lines.append(f"| {width} | {name} | {statistics.median(values):.2f} | {pairs} | {verdict} |")
    return "\n".join(lines)


def ratio(numerator: float | None, denominator: float | None) -> str:
    return "-" if numerator is None or denominator is None else f"{numerator / denominator:.2f}"


def seconds_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def spread_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def spread_after_cell(result: DepthResult) -> str:
    """The spread after Part 2; "undone" where Part 2 measured rates but magicinit did not keep its rescaling."""
    if result.rate_spread_after is None and result.rate_spread_before is not None:
        return "undone"
    return spread_cell(result.rate_spread_after)


def print_details(result: DepthResult) -> None:
    """What the table leaves out: every repeat's times and Part 1 / forward ratios.

    They show how noisy the minima are; then the model calls per run, and
    magicinit's warnings and notes.
    """
    timed_names = {
        FORWARD: "forward",
        PART1_WALL: "Part 1",
        LSUV: "lsuv",
        FORWARD_BACKWARD: "fwd+bwd (Part 2 samples)",
        PART2_BETWEEN: "Part 2",
        RESCALE_FORWARD_BACKWARD: "fwd+bwd before rescale_",
        RESCALE: "rescale_",
    }
    times = [
        f"{label} " + "/".join(f"{seconds:.3f}" for seconds in result.seconds[measurement])
        for measurement, label in timed_names.items()
        if measurement in result.seconds
    ]
    calls = [f"{timed_names[measurement]} {count}" for measurement, count in result.model_calls.items()]
    paired = "/".join(
        f"{part1 / forward:.2f}" for part1, forward in zip(result.seconds[PART1_WALL], result.seconds[FORWARD])
    )
    print(f"depth {result.depth}: every run, s: {', '.join(times)}")
    print(f"depth {result.depth}: Part 1 / forward in each pair: {paired}")
    print(f"depth {result.depth}: model calls per run: {', '.join(calls)}")
    for message in sorted(result.messages):
        print(f"depth {result.depth}: magicinit {message}")


def part2_calls_cell(result: DepthResult, samples: int) -> str:
    calls = result.model_calls.get(PART2_BETWEEN)
    return "-" if calls is None else f"{calls} ({calls / samples:.1f})"


def deviation_cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f} % ({'PASS' if value <= DEVIATION_TARGET else 'MISS'} ≤ {100 * DEVIATION_TARGET:.0f} %)"


def memory_cell(result: DepthResult) -> str:
    """``init_``'s extra peak over forward+backward's, with both in MiB."""
    init_peak, reference = (result.peak_bytes.get(kind) for kind in ("init_", "forward+backward"))
    if init_peak is None or not reference:
        return "-"
    return f"{init_peak / reference:.2f} ({init_peak / 2**20:.0f} / {reference / 2**20:.0f} MiB)"


def markdown_table(results: Sequence[DepthResult], args: argparse.Namespace) -> str:
    header = [
        "depth",
        "forward s",
        "Part 1 s (within)",
        "Part 1 / forward",
        f"≤ {PART1_TARGET}?",
        "lsuv s",
        "lsuv / forward",
        "lsuv / Part 1",
        "Part 2 / (fwd+bwd)",
        "Part 2 model calls (passes)",
        "rate spread before → after",
        "rescale_ / (fwd+bwd)",
        f"≤ {RESCALE_TARGET:g}?",
        "after rescale_, re-measured here: max deviation from geometric mean",
        "peak memory: init_ / (fwd+bwd)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        part1_ratio = result.part1_ratio
        lsuv_ratio = result.paired_ratio(LSUV, LSUV_FORWARD)
        rescale_ratio = result.paired_ratio(RESCALE, RESCALE_FORWARD_BACKWARD)
        cells = [
            str(result.depth),
            seconds_cell(result.best(FORWARD)),
            f"{seconds_cell(result.best(PART1_WALL))} ({seconds_cell(result.best(PART1_WITHIN))})",
            f"{part1_ratio:.2f}",
            "PASS" if result.meets_target else "MISS",
            seconds_cell(result.best(LSUV)),
            "-" if lsuv_ratio is None else f"{lsuv_ratio:.2f}",
            "-" if lsuv_ratio is None else f"{lsuv_ratio / part1_ratio:.1f}",
            ratio(result.best(PART2_BETWEEN), result.best(FORWARD_BACKWARD)),
            part2_calls_cell(result, args.part2_samples),
            f"{spread_cell(result.rate_spread_before)} → {spread_after_cell(result)}",
            "-" if rescale_ratio is None else f"{rescale_ratio:.2f}",
            "-" if rescale_ratio is None else ("PASS" if rescale_ratio <= RESCALE_TARGET else "MISS"),
            deviation_cell(result.rescale_deviation),
            memory_cell(result),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.platform()}, "
        f"{os.cpu_count()} CPUs, device {device} ({name})"
    )


def load_average() -> str:
    """The 1-minute load average: above the CPU count, other work competed for the CPUs."""
    if not hasattr(os, "getloadavg"):
        return "load average unknown"
    return f"load average {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs"


def chosen_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        print("note: --device cuda asked for but CUDA is not available; using cpu")
        return torch.device("cpu")
    return torch.device(requested)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--depths", type=int, nargs="+", default=[8, 16, 32], help="conv+linear layers per model (at least 3)"
    )
    parser.add_argument("--samples", type=int, default=256, help="samples for forward, Part 1 and lsuv")
    parser.add_argument(
        "--part2-samples", type=int, default=128, help="samples for Part 2 and its forward+backward reference"
    )
    parser.add_argument("--width", type=int, default=32, help="channels of every conv")
    parser.add_argument(
        "--pairs",
        type=int,
        default=7,
        help="forward / Part 1 pairs timed back to back; the median pair ratio is reported",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="repeats of lsuv (each after a forward) and of Part 2; minimum times are kept",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--data-root",
        type=Path,
        default=DEFAULT_DATA_ROOT if DEFAULT_DATA_ROOT.is_dir() else None,
        help="accepted for consistency with the other benches; this one uses Gaussian inputs",
    )
    parser.add_argument("--quick", action="store_true", help="depths 8 16, 1 repeat")
    parser.add_argument("--no-lsuv", action="store_true", help="leave out the lsuv measurements")
    parser.add_argument("--sampler-depth", type=int, default=16, help="depth of the model for the sampler rows")
    parser.add_argument(
        "--sampler-widths", type=int, nargs="+", default=[32, 64], help="widths of the model for the sampler rows"
    )
    parser.add_argument("--no-samplers", action="store_true", help="leave out the sampler rows")
    parser.add_argument(
        "--check-rounds",
        type=int,
        default=4,
        help="draws per sample of this script's own re-measurement of the rates after rescale_",
    )
    parser.add_argument("--memory-probe", choices=MEMORY_PROBES, help=argparse.SUPPRESS)  # internal: one probe
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.repeats, args.pairs = [8, 16], 1, 3
    if min(args.depths) < 3:
        parser.error("every depth must be at least 3 (a first conv, a hidden conv, the linear layer)")
    if not args.no_lsuv and lsuv is None:
        parser.error("lsuv is not installed: pip install -e '.[bench]' -c constraints.txt, or pass --no-lsuv")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_probe is not None:  # a child process of peak_memory
        print(memory_probe(args.memory_probe, args.depths[0], args))
        return 0
    device = chosen_device(args.device)
    started = time.perf_counter()
    print(f"machine: {machine_line(device)}")
    print(f"at start: {load_average()}")
    print(
        f"models: plain ReLU CNN, width {args.width}, no batch norm; inputs: Gaussian {(args.samples, *IMAGE_SHAPE)}, "
        f"seed {INPUT_SEED}; Part 2 on {args.part2_samples} samples; {args.pairs} forward/Part 1 pairs, "
        f"{args.repeats} repeat(s); "
        f"data root {args.data_root} (unused)"
    )
    if not args.no_lsuv:
        print(
            f"lsuv {importlib.metadata.version('lsuv')}: lsuv_with_singlebatch(model, x, verbose=False, "
            f"device={device}) with its defaults {lsuv_defaults()}"
        )
    inputs = gaussian_inputs(args.samples, device)
    part2_inputs = gaussian_inputs(args.part2_samples, device, seed=INPUT_SEED + 1)
    results = []
    for depth in args.depths:
        results.append(measure_depth(depth, args, inputs, part2_inputs, device))
        print(f"  depth {depth} done ({time.perf_counter() - started:.0f}s)", flush=True)
    print()
    print(markdown_table(results, args))
    print()
    for result in results:
        print_details(result)
    if not args.no_samplers:
        print()
        print(
            f"Samplers: Part 1 (init_(between=False)) with each sampler over the same one with gaussian, "
            f"depth-{args.sampler_depth} plain CNN, {args.samples} samples, {args.repeats} pairs:"
        )
        print()
        print(sampler_table({width: measure_samplers(args, inputs, device, width) for width in args.sampler_widths}))
        print()
    missed = [result.depth for result in results if not result.meets_target]
    verdict = "met at every depth" if not missed else f"missed at depth {', '.join(map(str, missed))}"
    print(f"Part 1 / forward <= {PART1_TARGET}: {verdict}")
    print(f"total {time.perf_counter() - started:.0f}s; {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
