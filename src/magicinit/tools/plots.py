"""Figures of reports and training curves (matplotlib, the optional ``plot`` extra).

Figures are drawn on ``matplotlib.figure.Figure`` objects and saved directly,
without pyplot, so nothing global (backends, open figures) is touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import Diagnosis, MagicInitError, Report

__all__ = ["plot_curves", "plot_layer_statistics", "require_matplotlib"]


def require_matplotlib(purpose: str) -> None:
    """Raise a ``MagicInitError`` with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MagicInitError(f"{purpose} needs matplotlib: pip install 'magicinit[plot]'") from None


def _figure(columns: int, width: float, height: float) -> tuple[Any, list[Any]]:
    require_matplotlib("drawing a figure")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _std_band(stds: Sequence[float]) -> tuple[float, float, float]:
    """Median, and distances down to the minimum and up to the maximum (for error bars)."""
    positive = sorted(s for s in stds if s > 0) or [float("nan")]
    median = positive[len(positive) // 2]
    return median, median - positive[0], positive[-1] - median


def _series(ax: Any, xs: Sequence[float], values: Sequence[float | None], errors: Any, label: str, marker: str) -> None:
    points = [(x, v, i) for i, (x, v) in enumerate(zip(xs, values)) if v is not None and v > 0 and math.isfinite(v)]
    if not points:
        return
    x, y, index = zip(*points)
    if errors is not None:
        errors = [[errors[0][i] for i in index], [errors[1][i] for i in index]]
    ax.errorbar(x, y, yerr=errors, label=label, marker=marker, capsize=3, linestyle="-", linewidth=1)


def plot_layer_statistics(result: Report | Diagnosis, path: str | Path, title: str = "") -> None:
    """Per layer, channel std (median, whiskers from min to max) and change rate, on log axes.

    For a ``Report``: before and after Part 1 (std) and Part 2 (rate); for a
    ``Diagnosis``: the model as it is, the rate with its standard error band.
    The file type follows ``path``'s suffix (PNG, PDF, SVG).
    """
    figure, (std_axis, rate_axis) = _figure(2, 12, 4.5)
    layers = result.layers
    names = [layer.name or "(model)" for layer in layers]
    xs = list(range(len(layers)))
    if isinstance(result, Report):
        for attribute, label, marker in (
            ("channel_std_before", "before Part 1", "o"),
            ("channel_std_after", "after Part 1", "s"),
        ):
            bands = [_std_band(getattr(layer, attribute)) if getattr(layer, attribute) else None for layer in layers]
            medians = [band[0] if band else None for band in bands]
            whiskers = ([band[1] if band else 0.0 for band in bands], [band[2] if band else 0.0 for band in bands])
            _series(std_axis, xs, medians, whiskers, label, marker)
        for attribute, label, marker in (("rate_before", "before Part 2", "o"), ("rate_after", "after Part 2", "s")):
            rates = [getattr(layer, attribute) for layer in layers]
            log_errors = [getattr(layer, attribute + "_log_error") or 0.0 for layer in layers]
            errors = _log_error_bars(rates, log_errors)
            _series(rate_axis, xs, rates, errors, label, marker)
    else:
        spreads = [_std_band(layer.channel_std) for layer in result.layers]
        _series(std_axis, xs, [b[0] for b in spreads], ([b[1] for b in spreads], [b[2] for b in spreads]), "now", "o")
        rates = [layer.rate for layer in result.layers]
        log_errors = [layer.rate_log_error for layer in result.layers]
        _series(rate_axis, xs, rates, _log_error_bars(rates, log_errors), "now", "o")
    for axis, label in ((std_axis, "channel std (median, min-max)"), (rate_axis, "relative change rate $C_k$")):
        axis.set_yscale("log")
        axis.set_ylabel(label)
        axis.set_xticks(xs, names, rotation=70, ha="right", fontsize=7)
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    std_axis.set_title("output channels (Part 1)")
    rate_axis.set_title("change rates (Part 2)")
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=120)


def _log_error_bars(values: Sequence[float | None], log_errors: Sequence[float]) -> tuple[list[float], list[float]]:
    down = [v * (1 - math.exp(-e)) if v else 0.0 for v, e in zip(values, log_errors)]
    up = [v * (math.exp(e) - 1) if v else 0.0 for v, e in zip(values, log_errors)]
    return down, up


def plot_curves(
    panels: dict[str, dict[str, list[float]]],
    path: str | Path,
    ylabel: str = "training loss",
    xlabel: str = "step",
    log_y: bool = True,
    title: str = "",
) -> None:
    """One panel per entry of ``panels``, each a set of named curves (e.g. loss per init)."""
    figure, axes = _figure(len(panels), 5.5 * len(panels), 4)
    for axis, (panel, curves) in zip(axes, panels.items()):
        for label, values in curves.items():
            axis.plot(range(1, len(values) + 1), values, label=label, linewidth=1.2)
        if log_y:
            axis.set_yscale("log")
        axis.set_title(panel)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=120)
