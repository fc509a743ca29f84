"""What magicinit does to a zoo of models, and where its time goes: the README's zoo table, measured.

Families (``--family``; each writes its own section of ``bench/RESULTS.md``; the models, their inputs and
forwards are in ``bench/zoo_models.py``):

* ``torchvision`` (the default): torchvision's classifiers (``get_model(name, weights=None)``), the
  segmentation model ``lraspp_mobilenet_v3_large`` and the detector ``ssdlite320_mobilenet_v3_large`` (at
  160 px, with docs/guide.md's detector recipe as ``forward=``), and the built-in ``caffenet``; section
  ``## bench/zoo.py``;
* ``timm``: ``timm.create_model(name, pretrained=False)`` (``img_size=64`` where the model has a fixed
  size); section ``## bench/zoo.py --family timm``;
* ``hf``: Hugging Face's T5 and Llama from small configs, where ``transformers`` is importable (otherwise
  the section says that it was not run); section ``## bench/zoo.py --family hf``.

For each model (seeded) it runs ``magicinit.init_`` with its defaults (and ``across_normalization=True``),
mostly on 8 Gaussian 3 x 64 x 64 inputs (``--samples N``: N of them, in a section of its own), and
tabulates, from the report:

* Part 1: how many of the convolution/linear layers were normalized (the others
  are never called in an eval-mode forward, e.g. googlenet's auxiliary heads);
* Part 2: how many layers it rescaled, and which operations fix layers' input
  or output scales (``batch_norm``, ``layer_norm``, ``gelu``, ``hardsigmoid``,
  ...; counted once per layer side; the model's own input and output do not
  count), with the change-rate spread (max/min over all layers) before and after;
* the time of ``init_`` over the time of one forward pass of the same inputs (the median
  over ``--repeats`` fresh copies of the model: these machines are noisy).

A second table runs every model again with ``scale_mode="approximate"``: layers
rescaled, rate spread after, the operations treated as homogeneous on the data,
the output change beyond one global factor, and the rounds. A third says where the time of ``init_`` goes in
both modes (``Report.seconds`` and ``Report.between_seconds``), each stage in forward passes (its seconds over
the forward's), so that the stages add up to init_ / forward.

With ``--device cuda`` the models and inputs are on the GPU and every timed region is
synchronized (``torch.cuda.synchronize``); its section's heading ends in ``--device cuda``.
``--json PATH`` also writes the rows as JSON (``bench/gpu.sh`` reads them).

Output: the tables on stdout, and the family's section of ``bench/RESULTS.md``. Run from the repository root
(the torchvision family: about 5 minutes on 2 CPU cores; timm with ``--repeats 1``: about 25)::

    pip install -c constraints.txt -e ".[test,bench]"
    python bench/zoo.py
    python bench/zoo.py --family timm --repeats 1
    python bench/zoo.py --device cuda --models resnet18 vgg11 --no-approximate --json zoo.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import platform
import re
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import magicinit
from magicinit import Report
from magicinit.tools.baselines import BASELINES
from results_file import BENCH, commit, replace_section, synchronize
from zoo_models import BUILT_IN, FAMILIES, IMAGES, SAMPLES, ModelSpec, default_models, hf_missing, spec
from zoo_models import build as build_spec

__all__ = ["BUILT_IN", "build", "measure", "stage_forwards", "time_table"]

USUAL_PINS = {"model input", "model output"}
FORWARD_REPEATS = 5  # the forward is timed this many times; the median is the ratio's denominator
INIT_REPEATS = 3  # init_ is timed on this many fresh copies (exact mode; --repeats); the median copy is tabulated
DEFAULT_THREADS = 2  # torch CPU threads unless --threads
RATE_WAYS = ("from site activations", "vectorized per-sample gradients", "one sample at a time")
# the columns of the time table: stage -> the keys of Report.seconds / Report.between_seconds it sums
TIME_COLUMNS: dict[str, tuple[str, ...]] = {
    "trace": ("seconds:data", "seconds:trace"),
    "Part 1": ("seconds:within",),
    "rates": ("between:rates",),
    "solve": ("between:solve",),
    "checks": ("between:checks",),
    "retrace": ("between:retrace",),
}
OTHER = "other"  # the rest of init_'s wall time: snapshots, restores, bookkeeping, Part 2's own, the API's
TARGET_FORWARDS = 20.0  # issue 28's target for init_ / forward in exact mode; a row above it says why


@dataclass
class ZooRow:
    """One model's line of the tables (one scale mode)."""

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
    rate_measurements: int = 0  # Part 2's change-rate measurements (Report.rate_measurements)
    rate_way: str = "-"
    forward_seconds: float | None = None  # the median forward of the copy whose ratio is the median
    init_seconds: float | None = None  # that copy's init_
    kaiming_seconds: float | None = None  # torch_init_seconds of that copy
    scale_mode: str = "exact"
    seconds: dict[str, float] = field(default_factory=dict)  # that copy's Report.seconds
    between_seconds: dict[str, float] = field(default_factory=dict)  # and Report.between_seconds
    rate_draws: int | None = None  # noise draws of one change-rate measurement
    rate_errors: tuple[float, float] | None = None  # the rates' standard errors in log C: (worst, median) layer's
    rate_precision: float | None = None  # the precision asked (rate_precision)
    samples_used: int | None = None
    input: str = IMAGES.format(count=SAMPLES)
    error: str | None = None  # init_ (or the model) failed: the exception, and nothing else is filled in


def fixing_op(reason: str | None) -> str | None:
    """The operation named in a "fixed by" reason ("batch_norm in 'bn1'" -> "batch_norm"); None for the usual ones."""
    if reason is None or reason in USUAL_PINS:
        return None
    return reason.split(" in ")[0]


def rate_draws(report: Report) -> int | None:
    """The noise draws of one change-rate measurement (the note "change rates from N noise draws", in
    approximate mode "... per measurement": it measures again in its scale rounds); None where none was made."""
    draws = [int(n) for note in report.notes for n in re.findall(r"change rates from (\d+) noise draws", note)]
    return max(draws) if draws else None


def rate_errors(report: Report) -> tuple[float, float] | None:
    """The standard errors of the measured rates (before Part 2) in ``log C``: the worst layer's and the
    median layer's (the upper median), over the layers with a positive, finite rate (a rate of 0, where no
    gradient reaches the layer, e.g. behind timm's zero-initialized last batch norm of a residual branch,
    is exact); None where no such rate was measured."""
    errors = sorted(
        layer.rate_before_log_error
        for layer in report.layers
        if layer.rate_before_log_error is not None and 0 < (layer.rate_before or 0) < math.inf
    )
    return (errors[-1], errors[len(errors) // 2]) if errors else None


def summarize(
    name: str,
    report: Report,
    caught: list[warnings.WarningMessage],
    ratio: float,
    seconds: tuple[float | None, float | None, float | None] = (None, None, None),
) -> ZooRow:
    """The table row of one model's report; ``seconds``: (forward, init_, kaiming_normal_) of the median copy."""
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
        warnings=list(dict.fromkeys(str(w.message) for w in caught)),
        init_over_forward=ratio,
        output_change_beyond_scale=report.output_change_beyond_scale,
        approximated=len(report.approximated),
        rounds=report.scale_rounds,
        rate_measurements=report.rate_measurements,
        rate_way=next((way for note in report.notes for way in RATE_WAYS if f"samples; {way}" in note), "-"),
        forward_seconds=seconds[0],
        init_seconds=seconds[1],
        kaiming_seconds=seconds[2],
        scale_mode=str(report.settings.get("scale_mode", "exact")),
        seconds=dict(report.seconds),
        between_seconds=dict(report.between_seconds),
        rate_draws=rate_draws(report),
        rate_errors=rate_errors(report),
        rate_precision=report.settings.get("rate_precision"),
        samples_used=report.settings.get("samples_used"),
    )


def torch_init_seconds(model: nn.Module, device: torch.device) -> float:
    """Seconds ``torch.nn.init`` takes to initialize the convolution and linear layers of a copy of ``model``
    (the ``kaiming`` baseline of ``magicinit.tools.baselines``: ``kaiming_normal_`` of every weight, zeros for
    every bias; synchronized): what a user's usual init costs, against which init_'s fixed costs (drawing,
    copying and checking large weights) are read."""
    twin = copy.deepcopy(model)
    synchronize(device)
    started = time.perf_counter()
    with torch.no_grad():
        BASELINES["kaiming"](twin)
    synchronize(device)
    seconds = time.perf_counter() - started
    del twin
    return seconds


def build(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """The model as the command line builds ``torchvision:NAME`` (no pretrained weights) or a built-in, or a
    torchvision extra of ``bench/zoo_models.py``, seeded, on ``device``."""
    return build_spec(spec(name), device)


def measure(
    model_spec: ModelSpec | str,
    inputs: Any = None,
    scale_mode: str = "exact",
    repeats: int = 1,
    device: torch.device | str | None = None,
    samples: int = SAMPLES,
) -> ZooRow:
    """Initialize the model and time ``init_`` against one eval-mode forward pass (the median of
    ``FORWARD_REPEATS``) timed just before it (and ``torch_init_seconds`` after it); with ``repeats`` > 1, on that
    many fresh copies of the model (the
    same seeds, so the same report), and the row of the median copy by ratio (the lower middle one for an even
    count). ``model_spec``: a ``ModelSpec`` or a torchvision name; ``inputs``: the init data (default: the spec's
    of ``samples`` samples, on ``device``, default the CPU). A failure of the model or of ``init_`` is a row with
    ``error``."""
    model_spec = spec(model_spec) if isinstance(model_spec, str) else model_spec
    if inputs is None:
        inputs = model_spec.inputs(samples).to(device or "cpu")
    device = torch.device(device) if device is not None else inputs.device
    forward = model_spec.forward or (lambda model, batch: model(batch))
    timings = []  # (ratio, forward seconds, init_ seconds, report, warnings) of each copy
    for _ in range(repeats):
        try:
            model = build_spec(model_spec, device)
            with torch.no_grad():
                forward(model.eval(), inputs)  # warm-up
                forwards = []
                for _ in range(FORWARD_REPEATS):
                    synchronize(device)
                    started = time.perf_counter()
                    forward(model, inputs)
                    synchronize(device)
                    forwards.append(time.perf_counter() - started)
                forward_seconds = statistics.median(forwards)
            gc.collect()  # earlier models' garbage: no collection inside init_'s stages
            model.train()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                synchronize(device)
                started = time.perf_counter()
                report = magicinit.init_(
                    model,
                    inputs,
                    seed=0,
                    scale_mode=scale_mode,
                    across_normalization=True,
                    forward=model_spec.forward,
                )
                synchronize(device)
                init_seconds = time.perf_counter() - started
            # after init_ (a copy made before it would change what init_ finds in memory): the time does not
            # depend on the weights' values
            kaiming_seconds = torch_init_seconds(model, device)
        except Exception as error:  # a row that says why, and the run goes on
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            return ZooRow(
                model_spec.name, 0, 0, 0, 0, Counter(), None, None, [], float("nan"), scale_mode=scale_mode,
                input=model_spec.input_words.format(count=samples), error=message,
            )  # fmt: skip
        timings.append((init_seconds / forward_seconds, forward_seconds, init_seconds, kaiming_seconds, report, caught))
    ratio, forward_seconds, init_seconds, kaiming_seconds, report, caught = sorted(timings, key=lambda t: t[0])[
        (len(timings) - 1) // 2
    ]
    row = summarize(model_spec.name, report, caught, ratio, (forward_seconds, init_seconds, kaiming_seconds))
    row.input = model_spec.input_words.format(count=samples)
    return row


def stage_forwards(row: ZooRow) -> dict[str, float]:
    """Where ``row``'s init_ went, in forward passes (seconds over the forward's): one entry per column of
    ``TIME_COLUMNS`` whose stages ran, and ``other``, the rest of init_'s measured wall time (the report's own
    ``other``, Part 2's ``other``, and what the API does around the stopwatch), so that the values add up to
    ``init_seconds / forward_seconds``. Empty for a failed row."""
    if row.error is not None or row.init_seconds is None or not row.forward_seconds:
        return {}
    source = {f"seconds:{k}": v for k, v in row.seconds.items()} | {
        f"between:{k}": v for k, v in row.between_seconds.items()
    }
    stages = {}
    for column, keys in TIME_COLUMNS.items():
        if any(key in source for key in keys):
            stages[column] = sum(source.get(key, 0.0) for key in keys)
    stages[OTHER] = row.init_seconds - sum(stages.values())
    return {column: seconds / row.forward_seconds for column, seconds in stages.items()}


def _largest(stages: dict[str, float]) -> tuple[str, float]:
    """The stage that took most forward passes, and how many."""
    return max(stages.items(), key=lambda item: item[1])


def dominant(row: ZooRow) -> str:
    """The stage that took most of ``row``'s init_, with its share, and for the change rates the rounds
    (noise draws over samples), for approximate mode's checks and retrace the scale rounds."""
    stages = stage_forwards(row)
    if not stages:
        return "-"
    total = sum(stages.values())
    stage, value = _largest(stages)
    words = f"{stage} {100 * value / total:.0f} %"
    if stage == "rates" and row.rate_draws and row.samples_used:
        words += f" ({row.rate_draws} draws on {row.samples_used} samples{_per_measurement(row)})"
    elif stage in ("checks", "retrace", "solve") and row.scale_mode == "approximate":
        words += f" ({_counted(row.rounds, 'scale round')})"
    return words


def _per_measurement(row: ZooRow) -> str:
    """What the rates' draws of ``row`` are counted over: nothing to add in exact mode (one measurement), in
    approximate mode each of its measurements (before its scale rounds, and where the rounds' predicted rates
    end)."""
    if row.scale_mode == "exact":
        return ""
    measurements = _counted(row.rate_measurements, "measurement")
    return f" per measurement, {measurements} for {_counted(row.rounds, 'scale round')}"


def _counted(count: int, noun: str) -> str:
    """``count`` and ``noun``, plural unless one ("1 scale round", "2 scale rounds")."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def why_above_target(row: ZooRow) -> str:
    """Why ``row``'s init_ took more than ``TARGET_FORWARDS`` forward passes, from its own measurements ("-"
    where it did not): the stage that took most of it, and for the change rates what their noise asked. The
    rates' noise error falls as one over the square root of the draws, so where the draws' budget ran out
    with the worst layer's error ``e`` above the precision asked ``p``, reaching ``p`` would take about
    ``(e / p)^2`` times the draws, and the rates' forward passes with them; where the precision was met, the
    draws it took say it."""
    stages = stage_forwards(row)
    if not stages or sum(stages.values()) <= TARGET_FORWARDS:
        return "-"
    stage, value = _largest(stages)
    words = f"{stage}: {value:.0f} forwards"
    if stage != "rates" or not row.rate_draws or not row.samples_used:
        kaiming = kaiming_forwards(row)
        if kaiming is not None and stage != "trace":  # the stages that draw, copy or check every weight
            words += f" (kaiming_normal_ of the same layers alone: {kaiming:.1f})"
        return words
    rounds = row.rate_draws / row.samples_used  # per measurement, in draws of every sample
    words += f" for {row.rate_draws} draws ({rounds:g} rounds of the {row.samples_used} samples{_per_measurement(row)})"
    if row.rate_errors is None or row.rate_precision is None:
        return words
    worst = row.rate_errors[0]
    if worst > row.rate_precision:
        factor = (worst / row.rate_precision) ** 2
        return (
            words + f"; the budget ran out at error {worst:.3f}: {row.rate_precision:g} would take about "
            f"{factor * row.rate_draws:.0f} draws, {factor * value:.0f} forwards"
        )
    return words + f", which error {row.rate_precision:g} took"


def kaiming_forwards(row: ZooRow) -> float | None:
    """``row``'s ``kaiming_normal_`` time in forward passes (None where it was not measured)."""
    if row.kaiming_seconds is None or not row.forward_seconds:
        return None
    return row.kaiming_seconds / row.forward_seconds


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
        if row.error is not None:
            lines.append(f"| {row.name} | failed: {row.error} | - | - | - | - | - | - |")
            continue
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
        if other.error is not None:
            lines.append(f"| {row.name} | failed: {other.error} | - | - | - | - |")
            continue
        change = "-" if other.output_change_beyond_scale is None else f"{other.output_change_beyond_scale:.1e}"
        rescaled = "-" if row.error is not None else row.rescaled
        lines.append(
            f"| {row.name} | {rescaled} → {other.rescaled} | {spread(row.spread_after)} → "
            f"{spread(other.spread_after)} | {other.approximated} | {change} | {other.rounds} |"
        )
    return "\n".join(lines)


def time_table(rows: list[ZooRow]) -> str:
    """Where init_'s time goes, one line per row (model and scale mode): init_ / forward, then each stage in
    forward passes (``stage_forwards``; "-" where the stage did not run), the stage that dominates, and the
    forward's milliseconds. The stage columns add up to init_ / forward up to the rounding of the figures."""
    columns = [*TIME_COLUMNS, OTHER]
    lines = [
        "| model | mode | init_ / forward | "
        + " | ".join(columns)
        + " | most of the time | forward ms | kaiming_normal_ / forward | rate draws per measurement "
        + f"| rate error worst / median (asked) | above {TARGET_FORWARDS:g} forwards: why |",
        "|---|---|---|" + "---|" * len(columns) + "---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error is not None:
            lines.append(f"| {row.name} | {row.scale_mode} | failed: {row.error} |" + " - |" * (len(columns) + 6))
            continue
        stages = stage_forwards(row)
        total = sum(stages.values())
        figures = " | ".join(f"{stages[c]:.1f}" if c in stages else "-" for c in columns)
        milliseconds = "-" if row.forward_seconds is None else f"{1000 * row.forward_seconds:.1f}"
        draws = "-" if row.rate_draws is None else str(row.rate_draws)
        kaiming = kaiming_forwards(row)
        kaiming_words = "-" if kaiming is None else f"{kaiming:.1f}"
        errors = "-"
        if row.rate_errors is not None:
            errors = f"{row.rate_errors[0]:.3f} / {row.rate_errors[1]:.3f}"
            errors += f" ({row.rate_precision:g})" if row.rate_precision is not None else ""
        lines.append(
            f"| {row.name} | {row.scale_mode} | {total:.1f} | {figures} | {dominant(row)} | {milliseconds} "
            f"| {kaiming_words} | {draws} "
            f"| {errors} | {why_above_target(row)} |"
        )
    return "\n".join(lines)


def device_words(device: torch.device) -> str:
    """``CPU``, or ``CUDA (the GPU's name)``."""
    return "CPU" if device.type == "cpu" else f"CUDA ({torch.cuda.get_device_name(device)})"


def versions() -> dict[str, str]:
    """The versions of the libraries the rows depend on (those importable)."""
    found = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    for name in ("timm", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    return found


def json_rows(
    rows: list[ZooRow],
    approximate_rows: list[ZooRow],
    device: torch.device,
    family: str = "torchvision",
    repeats: int = INIT_REPEATS,
    not_run: str | None = None,
    samples: int = SAMPLES,
) -> str:
    """The rows (and the approximate-mode rows) as JSON, with the device and versions; each row with its
    stages in forward passes (``forward_equivalents``, see ``stage_forwards``)."""

    def plain(row: ZooRow) -> dict:
        return dataclasses.asdict(row) | {
            "fixing_ops": dict(row.fixing_ops),
            "forward_equivalents": stage_forwards(row),
        }

    return json.dumps(
        {
            "device": device_words(device),
            **versions(),
            "family": family,
            "not_run": not_run,
            "samples": samples,
            "forward_repeats": FORWARD_REPEATS,
            "init_repeats": repeats,
            "approximate_repeats": 1,
            "rows": [plain(row) for row in rows],
            "approximate_rows": [plain(row) for row in approximate_rows],
        },
        indent=1,
    )


def heading_and_command(family: str, device: torch.device, repeats: int, samples: int = SAMPLES) -> tuple[str, str]:
    """The family's RESULTS.md heading and the command that writes it (another sample count: its own section)."""
    flags = (
        ("" if family == "torchvision" else f" --family {family}")
        + ("" if samples == SAMPLES else f" --samples {samples}")
        + ("" if device.type == "cpu" else " --device cuda")
    )
    heading = "## bench/zoo.py" + flags
    command = "python bench/zoo.py" + flags + ("" if repeats == INIT_REPEATS else f" --repeats {repeats}")
    return heading, command


def section_text(
    family: str,
    device: torch.device,
    threads: int,
    repeats: int,
    rows: list[ZooRow],
    approximate_rows: list[ZooRow],
    not_run: str | None = None,
    samples: int = SAMPLES,
) -> str:
    """The family's section of RESULTS.md: how it was run, the tables (or why it was not run), the warnings."""
    heading, command = heading_and_command(family, device, repeats, samples)
    measured = [row.name for row in rows]
    if rows and measured != default_models(family):
        command += " --models " + " ".join(measured)
    if rows and not approximate_rows:
        command += " --no-approximate"
    if threads != DEFAULT_THREADS:
        command += f" --threads {threads}"
    lines = [
        f"{heading}\n\nCommand, run from the repository root on {time.strftime('%Y-%m-%d')}, library at "
        f"commit {commit()}, " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ", "
        f"{platform.processor() or platform.machine()}, {threads} threads, {device_words(device)}:\n\n"
        f'```\npip install -c constraints.txt -e ".[test,bench]"\n{command}\n```'
    ]
    if not_run is not None:
        names = ", ".join(default_models(family))
        lines.append(f"Not run: {not_run} (models: {names}).")
        return "\n".join(lines) + "\n"
    inputs = Counter(row.input for row in rows + approximate_rows)
    usual = inputs.most_common(1)[0][0] if inputs else IMAGES.format(count=samples)
    others = {row.name: row.input for row in rows + approximate_rows if row.input != usual}
    lines.append(
        "`init_(model, x, seed=0, across_normalization=True)`, otherwise its defaults, on "
        + usual
        + "".join(f"; {name}: {words}" for name, words in others.items())
        + " (Part 2 through the normalization layers, to show what the graph allows; by default a "
        "normalization fixes the scale of the layer before it). init_ / forward is the time of init_ over that "
        f"of one eval-mode forward pass of the same inputs (the median of {FORWARD_REPEATS}) timed just before "
        + (
            f"it, the median over {repeats} fresh copies of the model"
            if repeats > 1
            else "it, on one copy of the model (not the median of several: a run with several took too long)"
        )
        + (" in exact mode, one copy in approximate mode" if approximate_rows else " in exact mode")
        + "; the per-sample gradient norms column says how "
        "Part 2 computed them (see docs/method.md)."
    )
    notes = [f"- {spec_note}" for spec_note in model_notes(family, rows)]
    if notes:
        lines.append("Models:\n\n" + "\n".join(notes))
    table = markdown_table(rows)
    if approximate_rows:
        table += (
            '\n\nThe same with `scale_mode="approximate"` (rescaled layers and spreads of both modes; the '
            "output change is on the first 32 init samples, after removing one global factor):\n\n"
            + approximate_table(rows, approximate_rows)
        )
    lines.append(table)
    lines.append(
        "Where the time goes (`Report.seconds`, `Report.between_seconds` of the tabulated copy), each stage in "
        "forward passes (its seconds over the forward's), so that a row's stages add up to its init_ / forward "
        "(up to the rounding of the figures): trace = the data and the graph trace; Part 1 = within; rates, "
        "solve, checks (the float64 and own-precision function checks; in approximate mode the output-budget "
        "checks) and retrace (approximate mode's re-tracing) are Part 2's; other = the rest (snapshots and "
        "restores, Part 2's bookkeeping, the API around the stopwatch). Rate draws: the change-rate "
        "measurement's noise draws per measurement (two rounds of every sample at least, unless the first "
        "round's bound meets the precision; later rounds draw the samples that weigh most); exact mode measures once, "
        "approximate mode before its scale rounds (the rounds of the approximate table) and again where their "
        "predicted rates end (more often only where that measurement finds the prediction off). Rate error: the "
        "standard error of the measured rates in log C (before Part 2; approximate mode's first measurement), "
        "the worst layer's and the median layer's, against the precision asked (`rate_precision`): where the "
        "draws' budget (`rate_max_rounds`) ran out first, the worst is above it. Above "
        f"{TARGET_FORWARDS:g} forwards (issue 28's target), the last column says why from the row's own figures: the "
        "stage that took most, and for the rates the draws the noise asked; where the budget ran out, the draws "
        "and forwards the precision asked would take (the error falls as one over the square root of the draws); "
        "for another stage, what torch.nn.init's kaiming_normal_ of the same convolution and linear layers takes "
        "alone (timed on a copy of the model after its init_): drawing that many weights is a fixed cost that "
        "init_ pays too, and on few small inputs it can exceed a forward. "
        + (
            f"These figures are ratios within one run on a shared machine ({threads} thread(s); other "
            "benchmarks ran beside it), not absolute speeds."
            if device.type == "cpu"
            else "Every stage boundary is synchronized."
        )
    )
    lines.append(time_table(rows + approximate_rows))
    warned = [f"- {row.name} ({row.scale_mode}): warning: {m}" for row in rows + approximate_rows for m in row.warnings]
    lines.append("\n".join(warned) if warned else "No warnings.")
    return "\n\n".join(lines) + "\n\n"


def model_notes(family: str, rows: list[ZooRow]) -> list[str]:
    """The notes of the family's models that were measured (how they were built and called)."""
    notes: list[str] = []
    for row in rows:
        try:
            model_spec = spec(row.name, family)
        except KeyError:
            continue
        notes.extend(f"{row.name}: {note}" for note in model_spec.notes)
        if family == "timm":
            from zoo_models import TIMM_ARGS

            args = TIMM_ARGS.get(row.name, {})
            notes.append(
                f"{row.name}: timm.create_model({row.name!r}, pretrained=False"
                + "".join(f", {k}={v!r}" for k, v in args.items())
                + ")"
            )
    return notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, default="torchvision", help="which models (default torchvision)")
    parser.add_argument(
        "--models", nargs="+", default=None, metavar="NAME", help="these models of the family (default: its list)"
    )
    parser.add_argument(
        "--no-approximate",
        dest="approximate",
        action="store_false",
        help="skip the second table (scale_mode='approximate')",
    )
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help=f"torch CPU threads (default {DEFAULT_THREADS})"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=INIT_REPEATS,
        help=f"fresh copies timed in exact mode (default {INIT_REPEATS}); the median copy is tabulated",
    )
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
        help="the markdown file whose '## bench/zoo.py' section (with --family F: '## bench/zoo.py --family F'; "
        "with --device cuda: ... '--device cuda') is replaced",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=SAMPLES,
        help=f"init samples of every model (default {SAMPLES}); another count writes a section of its own",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (torch.cuda.is_available() is False)")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    heading, _ = heading_and_command(args.family, device, args.repeats, args.samples)
    not_run = hf_missing() if args.family == "hf" else None
    rows: list[ZooRow] = []
    approximate_rows: list[ZooRow] = []
    if not_run is None:
        for name in args.models or default_models(args.family):
            model_spec = spec(name, args.family)
            rows.append(
                measure(model_spec, scale_mode="exact", repeats=args.repeats, device=device, samples=args.samples)
            )
            if args.approximate:
                approximate_rows.append(
                    measure(model_spec, scale_mode="approximate", device=device, samples=args.samples)
                )
            if args.json is not None:  # after every model: a run cut short keeps the models it measured
                args.json.write_text(
                    json_rows(rows, approximate_rows, device, args.family, args.repeats, samples=args.samples) + "\n"
                )
            print(f"  {name} done", flush=True)
    elif args.json is not None:
        args.json.write_text(json_rows([], [], device, args.family, args.repeats, not_run, args.samples) + "\n")
    section = section_text(
        args.family, device, args.threads, args.repeats, rows, approximate_rows, not_run, args.samples
    )
    print(section)
    replace_section(args.results, heading, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
