"""Reports of what magicinit measured and did: a plain-text table and a JSON-able dict."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum, StrEnum
from typing import Any

import torch

from .stats import coefficient_of_variation


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0 or (math.isfinite(value) and 1e-3 <= abs(value) < 1e4):
        return f"{value:.{digits}g}"
    return f"{value:.2e}"


def render_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class LayerStatus(StrEnum):
    """What happened to one affine layer (a ``str``: compares equal to its value)."""

    INITIALIZED = "initialized"  # Part 1 set it (Part 2 may have rescaled it too)
    CONSTANT = "constant"  # Part 1 found every output channel constant on the init data: nothing to normalize
    RESCALED = "rescaled"  # Part 2 only: its weight was rescaled (a factor other than 1) and the rescaling kept
    MEASURED = "measured"  # its change rate was measured; its weights are as they were (factor 1, or not kept)
    FIXED = "fixed"  # Part 2 found its scales fixed by the graph (its notes say by what): left as is, not measured
    EXCLUDED = "excluded"  # left alone: skipped, frozen, tied, reparametrized, or applied otherwise (the note says)
    NEVER_CALLED = "never called"  # the forward pass on the init data never called it
    UNCHANGED = "unchanged"  # called, but neither part measured or changed it (within=False and between=False)


@dataclass
class LayerReport:
    """One affine layer: what was measured and done.

    Channel statistics are over the init data (population std). ``*_before``
    of Part 1 are those of the freshly drawn filters with zero bias; ``*_after``
    those of the layer's output measured again after Part 1, with the final
    Part 1 weights of every layer (before Part 2, which keeps the function
    but may rescale the layer). Rates are relative change rates ``C_k``
    with the standard error of ``log C_k`` as spread. ``input_scale_fixed_by``
    and ``output_scale_fixed_by`` name what keeps Part 2 from rescaling the
    layer's input or output ("model input", "batch_norm in 'bn1'", ...; None
    where the scale is free): a layer fixed on both sides keeps its scale.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    calls: int
    status: LayerStatus
    notes: list[str] = field(default_factory=list)
    channel_mean_before: list[float] = field(default_factory=list)
    channel_std_before: list[float] = field(default_factory=list)
    channel_mean_after: list[float] = field(default_factory=list)
    channel_std_after: list[float] = field(default_factory=list)
    zero_variance_channels: list[int] = field(default_factory=list)
    rate_before: float | None = None
    rate_before_log_error: float | None = None
    rate_after: float | None = None
    rate_after_log_error: float | None = None
    weight_scale: float | None = None
    input_scale_fixed_by: str | None = None
    output_scale_fixed_by: str | None = None

    @property
    def std_cv_before(self) -> float | None:
        """Coefficient of variation of the channel stds before Part 1."""
        return coefficient_of_variation(torch.tensor(self.channel_std_before)) if self.channel_std_before else None

    @property
    def std_cv_after(self) -> float | None:
        """Coefficient of variation of the channel stds after Part 1."""
        return coefficient_of_variation(torch.tensor(self.channel_std_after)) if self.channel_std_after else None


@dataclass
class Report:
    """What ``init_`` or ``rescale_`` did, layer by layer.

    ``str(report)`` is a table; ``report.to_dict()`` is JSON-able;
    ``report["features.0"]`` is one layer's entry.
    """

    layers: list[LayerReport]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    # wall seconds by stage: data, trace, within (Part 1), between (Part 2), other (snapshots, restores)
    seconds: dict[str, float] = field(default_factory=dict)
    between_seconds: dict[str, float] = field(default_factory=dict)  # Part 2's: rates, solve, checks, other
    rate_spread_before: float | None = None
    rate_spread_after: float | None = None
    output_change: float | None = None  # relative output change caused by Part 2 on the init data
    output_scale: float | None = None  # global factor of that change (1 in exact mode)
    output_change_beyond_scale: float | None = None  # relative change once that factor is taken out
    scale_rounds: int = 0  # Part 2's rescaling rounds
    rate_measurements: int = 0  # Part 2's change-rate measurements (approximate mode predicts between its rounds)
    rates_after_predicted: bool = False  # rate_after from the exact factors, not a second measurement
    # per normalization module whose input Part 2 rescaled: {"input_factor": ..., "eps": its new eps}
    normalizations: dict[str, dict[str, float]] = field(default_factory=dict)
    approximated: dict[str, float] = field(default_factory=dict)  # ops treated as homogeneous, largest deviation

    def __getitem__(self, name: str) -> LayerReport:
        return _by_name(self.layers, name)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python values (JSON-able)."""
        data = asdict(self)
        for entry, layer in zip(data["layers"], self.layers):
            entry["shape"] = list(layer.shape)
            entry["std_cv_before"] = layer.std_cv_before
            entry["std_cv_after"] = layer.std_cv_after
        return _finite(data)

    def __str__(self) -> str:
        header = [
            "layer",
            "type",
            "shape",
            "status",
            "std before (mean/cv)",
            "mean/std after",
            "rate before",
            "rate after",
            "scale",
        ]
        rows = []
        for layer in self.layers:
            rows.append(
                [
                    layer.name or "(model)",
                    layer.type,
                    "x".join(map(str, layer.shape)),
                    layer.status,
                    f"{_fmt(_mean(layer.channel_std_before))}/{_fmt(layer.std_cv_before)}"
                    if layer.channel_std_before
                    else "-",
                    f"{_fmt(_mean(layer.channel_mean_after))}/{_fmt(_mean(layer.channel_std_after))}"
                    if layer.channel_std_after
                    else "-",
                    _fmt(layer.rate_before),
                    _fmt(layer.rate_after),
                    _fmt(layer.weight_scale),
                ]
            )
        lines = [render_table(header, rows)]
        if self.rate_spread_before is not None:
            lines.append(
                f"change-rate spread (max/min): before {_fmt(self.rate_spread_before)}, "
                f"after {_fmt(self.rate_spread_after)}"
            )
        notes = [f"  {layer.name or '(model)'}: {note}" for layer in self.layers for note in layer.notes]
        if notes:
            lines.append("layer notes:")
            lines.extend(notes)
        lines.extend(f"note: {note}" for note in self.notes)
        if self.seconds:
            stages = [f"{k} {v:.2f}s" for k, v in self.seconds.items()]
            if len(self.between_seconds) > 1 and "between" in self.seconds:  # more than its own "other"
                inside = ", ".join(f"{k} {v:.2f}s" for k, v in self.between_seconds.items())
                stages[list(self.seconds).index("between")] += f" ({inside})"
            lines.append("time: " + ", ".join(stages))
        return "\n".join(lines)


@dataclass
class LayerDiagnosis:
    """The reference's ``measure_stat`` summary for one layer.

    Attributes:
        output_cv: coefficient of variation of the channel stds (0 is ideal).
        rate: the layer's relative change rate ``C_k``.
        rate_mean: mean of the per-channel change rates.
        rate_cv: coefficient of variation of the per-channel change rates.
    """

    name: str
    type: str
    channel_mean: list[float]
    channel_std: list[float]
    output_cv: float
    rate: float
    rate_log_error: float
    rate_mean: float
    rate_cv: float


@dataclass
class Diagnosis:
    """Per-layer statistics of a model on some data (``magicinit.diagnose``), and notes on the data."""

    layers: list[LayerDiagnosis]
    draws: int
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> LayerDiagnosis:
        return _by_name(self.layers, name)

    def to_dict(self) -> dict[str, Any]:
        """The diagnosis as plain Python values (JSON-able)."""
        return _finite(asdict(self))

    def __str__(self) -> str:
        header = ["layer", "type", "output CV", "rate", "rate CV", "rate mean"]
        rows = [
            [d.name or "(model)", d.type, _fmt(d.output_cv), _fmt(d.rate), _fmt(d.rate_cv), _fmt(d.rate_mean)]
            for d in self.layers
        ]
        lines = [render_table(header, rows), f"({self.draws} noise draws)"]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def _by_name(layers: list[Any], name: str) -> Any:
    """The entry of the layer with this qualified name."""
    for layer in layers:
        if layer.name == name:
            return layer
    raise KeyError(name)


def _finite(value: Any) -> Any:
    """Replace inf/nan by None so the dict is strict JSON, and enum members by their plain values."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
