"""What magicinit does to torchvision's classifiers: the README's zoo table, measured.

For each model (``torchvision.models.get_model(name, weights=None)``, seeded)
it runs ``magicinit.init_`` with its defaults on 8 Gaussian 3 x 64 x 64 inputs
and tabulates, from the report:

* Part 1: how many of the convolution/linear layers were normalized (the others
  are never called in an eval-mode forward, e.g. googlenet's auxiliary heads);
* Part 2: how many layers it rescaled, and which operations fix layers' input
  or output scales (``batch_norm``, ``layer_norm``, ``gelu``, ``hardsigmoid``,
  ...; counted once per layer side; the model's own input and output do not
  count), with the change-rate spread (max/min over all layers) before and after;
* the time of ``init_`` over the time of one forward pass of the same inputs (the median
  over three fresh copies of the model: these machines are noisy).

The built-in ``caffenet`` (the paper's layout with LRN, width 1/4) comes last.
A second table runs every model again with ``scale_mode="approximate"``: layers
rescaled, rate spread after, the operations treated as homogeneous on the data,
the output change beyond one global factor, and the rounds.

With ``--device cuda`` the models and inputs are on the GPU and every timed region is
synchronized (``torch.cuda.synchronize``); its section is ``## bench/zoo.py --device cuda``.
``--json PATH`` also writes the rows as JSON (``bench/gpu.sh`` reads them).

Output: the tables on stdout, and the ``## bench/zoo.py`` section of
``bench/RESULTS.md``. Run from the repository root (about 3 minutes on 2 CPU cores)::

    pip install -c constraints.txt -e ".[test,bench]"
    python bench/zoo.py
    python bench/zoo.py --device cuda --models resnet18 vgg11 --no-approximate --json zoo.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

import magicinit
from magicinit import Report
from magicinit.tools.cli import load_model
from magicinit.tools.nets import TORCHVISION_CLASSIFIERS
from results_file import BENCH, commit, replace_section

USUAL_PINS = {"model input", "model output"}
FORWARD_REPEATS = 5  # the forward is timed this many times; the median is the ratio's denominator
INIT_REPEATS = 3  # init_ is timed on this many fresh copies; the table gives the median ratio
RATE_WAYS = ("from site activations", "vectorized per-sample gradients", "one sample at a time")


@dataclass
class ZooRow:
    """One model's line of the table."""

    name: str
    layers: int
    normalized: int
    never_called: int
    rescaled: int
    fixing_ops: Counter
    spread_before: float | None
    spread_after: float | None
    warnings: list[str]
    init_over_forward: float
    output_change_beyond_scale: float | None = None
    approximated: int = 0
    rounds: int = 0
    rate_way: str = "-"
    forward_seconds: float | None = None  # the median forward of the copy whose ratio is the median
    init_seconds: float | None = None  # that copy's init_


def fixing_op(reason: str | None) -> str | None:
    """The operation named in a "fixed by" reason ("batch_norm in 'bn1'" -> "batch_norm"); None for the usual ones."""
    if reason is None or reason in USUAL_PINS:
        return None
    return reason.split(" in ")[0]


def summarize(
    name: str,
    report: Report,
    caught: list[warnings.WarningMessage],
    ratio: float,
    seconds: tuple[float | None, float | None] = (None, None),
) -> ZooRow:
    """The table row of one model's report; ``seconds``: (forward, init_) of the median copy."""
    ops: Counter = Counter()
    for layer in report.layers:
        for reason in (layer.input_scale_fixed_by, layer.output_scale_fixed_by):
            op = fixing_op(reason)
            if op is not None:
                ops[op] += 1
    return ZooRow(
        name=name,
        layers=len(report.layers),
        normalized=sum(layer.status == "initialized" for layer in report.layers),
        never_called=sum(layer.status == "never called" for layer in report.layers),
        rescaled=sum(layer.weight_scale is not None and abs(layer.weight_scale - 1) > 1e-6 for layer in report.layers),
        fixing_ops=ops,
        spread_before=report.rate_spread_before,
        spread_after=report.rate_spread_after,
        warnings=[str(w.message) for w in caught],
        init_over_forward=ratio,
        output_change_beyond_scale=report.output_change_beyond_scale,
        approximated=len(report.approximated),
        rounds=report.scale_rounds,
        rate_way=next((way for note in report.notes for way in RATE_WAYS if f"samples; {way}" in note), "-"),
        forward_seconds=seconds[0],
        init_seconds=seconds[1],
    )


BUILT_IN = {"caffenet": {"width": 0.25, "classes": 1000}}  # built-in nets of magicinit.tools.nets, and their arguments


def build(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """The model as the command line builds ``torchvision:NAME`` (no pretrained weights) or a built-in, seeded,
    on ``device``."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet's note about its future default init
        model = load_model(name, BUILT_IN[name]) if name in BUILT_IN else load_model(f"torchvision:{name}", {})
    return model.to(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that the clock reads its end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, inputs: torch.Tensor, scale_mode: str = "exact", repeats: int = 1) -> ZooRow:
    """Initialize the model (on the device of ``inputs``) and time ``init_`` against one eval-mode forward pass
    (the median of ``FORWARD_REPEATS``) timed just before it; with ``repeats`` > 1, on that many fresh copies of
    the model (the same seeds, so the same report), and the median of their ratios."""
    device = inputs.device
    timings = []  # (ratio, forward seconds, init_ seconds) of each copy
    for _ in range(repeats):
        model = build(name, device)
        with torch.no_grad():
            model.eval()(inputs)  # warm-up
            forwards = []
            for _ in range(FORWARD_REPEATS):
                synchronize(device)
                started = time.perf_counter()
                model(inputs)
                synchronize(device)
                forwards.append(time.perf_counter() - started)
            forward_seconds = statistics.median(forwards)
        model.train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            synchronize(device)
            started = time.perf_counter()
            report = magicinit.init_(model, inputs, seed=0, scale_mode=scale_mode, across_normalization=True)
            synchronize(device)
            init_seconds = time.perf_counter() - started
        timings.append((init_seconds / forward_seconds, forward_seconds, init_seconds))
    _, forward_seconds, init_seconds = sorted(timings)[(len(timings) - 1) // 2]  # the median copy (lower)
    return summarize(name, report, caught, statistics.median(t[0] for t in timings), (forward_seconds, init_seconds))


def spread(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def markdown_table(rows: list[ZooRow]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| model | conv/linear layers | Part 1: normalized | Part 2: rescaled layers | scales fixed by | "
        "rate spread before → after | per-sample gradient norms | init_ / forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        part1 = f"{row.normalized}" + (f" ({row.never_called} never called)" if row.never_called else "")
        ops = ", ".join(f"{op} ×{count}" for op, count in row.fixing_ops.most_common()) or "-"
        lines.append(
            f"| {row.name} | {row.layers} | {part1} | {row.rescaled} | {ops} | "
            f"{spread(row.spread_before)} → {spread(row.spread_after)} | {row.rate_way} | {row.init_over_forward:.0f} |"
        )
    return "\n".join(lines)


def approximate_table(exact: list[ZooRow], approximate: list[ZooRow]) -> str:
    """The approximate-mode rows beside the exact ones, as a markdown table."""
    lines = [
        "| model | rescaled layers: exact → approximate | rate spread after: exact → approximate | "
        "operations treated as homogeneous | output change beyond a global factor | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for row, other in zip(exact, approximate):
        change = "-" if other.output_change_beyond_scale is None else f"{other.output_change_beyond_scale:.1e}"
        lines.append(
            f"| {row.name} | {row.rescaled} → {other.rescaled} | {spread(row.spread_after)} → "
            f"{spread(other.spread_after)} | {other.approximated} | {change} | {other.rounds} |"
        )
    return "\n".join(lines)


def device_words(device: torch.device) -> str:
    """``CPU``, or ``CUDA (the GPU's name)``."""
    return "CPU" if device.type == "cpu" else f"CUDA ({torch.cuda.get_device_name(device)})"


def json_rows(rows: list[ZooRow], approximate_rows: list[ZooRow], device: torch.device) -> str:
    """The rows (and the approximate-mode rows) as JSON, with the device and versions."""

    def plain(row: ZooRow) -> dict:
        return dataclasses.asdict(row) | {"fixing_ops": dict(row.fixing_ops)}

    return json.dumps(
        {
            "device": device_words(device),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "inputs": [8, 3, 64, 64],
            "forward_repeats": FORWARD_REPEATS,
            "init_repeats": INIT_REPEATS,
            "rows": [plain(row) for row in rows],
            "approximate_rows": [plain(row) for row in approximate_rows],
        },
        indent=1,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[*TORCHVISION_CLASSIFIERS, *BUILT_IN], metavar="NAME")
    parser.add_argument(
        "--no-approximate",
        dest="approximate",
        action="store_false",
        help="skip the second table (scale_mode='approximate')",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the models and inputs are (default cpu); cuda fails where CUDA is not available",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=BENCH / "RESULTS.md",
        help="the markdown file whose '## bench/zoo.py' section (with --device cuda: "
        "'## bench/zoo.py --device cuda') is replaced",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (torch.cuda.is_available() is False)")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    inputs = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
    rows, approximate_rows = [], []
    for name in args.models:
        rows.append(measure(name, inputs, repeats=INIT_REPEATS))
        if args.approximate:
            approximate_rows.append(measure(name, inputs, scale_mode="approximate"))
        if args.json is not None:  # after every model: a run cut short keeps the models it measured
            args.json.write_text(json_rows(rows, approximate_rows, device) + "\n")
        print(f"  {name} done", flush=True)
    table = markdown_table(rows)
    if approximate_rows:
        table += (
            '\n\nThe same with `scale_mode="approximate"` (rescaled layers and spreads of both modes; the '
            "output change is on the first 32 init samples, after removing one global factor):\n\n"
            + approximate_table(rows, approximate_rows)
        )
    print(table)
    notes = [f"- {row.name}: warning: {message}" for row in rows + approximate_rows for message in row.warnings]
    heading = "## bench/zoo.py" if device.type == "cpu" else "## bench/zoo.py --device cuda"
    command = "python bench/zoo.py" if device.type == "cpu" else "python bench/zoo.py --device cuda"
    section = (
        f"{heading}\n\nCommand, run from the repository root on {time.strftime('%Y-%m-%d')}, library at "
        f"commit {commit()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} threads, {device_words(device)}:\n\n"
        f'```\npip install -c constraints.txt -e ".[test,bench]"\n{command}\n```\n\n'
        "`init_(model, x, seed=0, across_normalization=True)`, otherwise its defaults, on 8 Gaussian 3 x 64 x 64 "
        "inputs (Part 2 through the normalization layers, to show what the graph allows; by default a "
        "normalization fixes the scale of the layer before it); "
        "init_ / forward is the time of init_ over that of one eval-mode forward pass of the same inputs "
        f"(the median of {FORWARD_REPEATS}) timed just before it, the median over {INIT_REPEATS} fresh copies of "
        "the model; the per-sample gradient norms column says how "
        "Part 2 computed them (see docs/method.md).\n\n"
        f"{table}\n\n" + ("\n".join(notes) + "\n\n" if notes else "No warnings.\n\n")
    )
    replace_section(args.results, heading, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
