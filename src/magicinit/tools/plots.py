"""Figures of reports, training curves and filters (matplotlib, the optional ``plot`` extra).

Figures are drawn on ``matplotlib.figure.Figure`` objects and saved directly,
without pyplot, so nothing global (backends, open figures) is touched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import Diagnosis, MagicInitError, Report
from .._core.adapters import find_affine_layers

__all__ = ["first_convolution", "plot_curves", "plot_filters", "plot_layer_statistics", "require_matplotlib"]


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


FILTER_CELL_PIXELS = 40  # about how many screen pixels a filter is drawn across (an integer number per weight)
_DPI = 100
_MARGIN, _TITLE_BAND, _LABEL_BAND, _PANEL_GAP, _MIN_WIDTH = 8, 26, 20, 10, 360  # pixels


def first_convolution(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first 2-d convolution of ``model``, with its qualified name.

    First in registration order among the model's affine layers
    (``magicinit._core.adapters.find_affine_layers``), which is the first the
    input meets in the usual nets; transposed convolutions are passed over.

    Args:
        model: the network.

    Example:
        >>> name, conv = first_convolution(torchvision.models.resnet18())  # ("conv1", Conv2d(3, 64, ...))
    """
    for name, module in find_affine_layers(model).items():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise MagicInitError(f"{type(model).__name__} has no 2-d convolution (nn.Conv2d) whose filters could be drawn")


def _panel_weights(name: str, source: Tensor | nn.Module) -> tuple[str, Tensor]:
    """The label and float32 CPU weights ``(out, in, kh, kw)`` of one panel, checked drawable."""
    if isinstance(source, nn.Module):
        layer, conv = first_convolution(source)
        name = f"{name}: layer {layer}" if name else f"layer {layer}"
        source = conv.weight
    what = f"plot_filters: {name!r}" if name else "plot_filters"
    if not isinstance(source, Tensor):
        raise MagicInitError(f"{what}: got {type(source).__name__}; expected a Tensor or an nn.Module")
    weights = source.detach().to("cpu", torch.float32)
    if weights.dim() != 4 or weights.shape[1] not in (1, 3) or weights.shape[0] == 0:
        raise MagicInitError(
            f"{what}: filters of shape {tuple(weights.shape)}; expected (out, in, kh, kw) with 1 (gray) or 3 (RGB) "
            "input channels and at least one filter (select channels first, e.g. weight[:, :3])"
        )
    return name, weights


def _normalized(weights: Tensor) -> Tensor:
    """Each filter min-max scaled to [0, 1] on its own (a constant filter: 0.5), as RGB ``(out, kh, kw, 3)``."""
    flat = weights.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    span = (high - low).view(-1, 1, 1, 1)
    scaled = torch.where(span > 0, (weights - low.view(-1, 1, 1, 1)) / torch.where(span > 0, span, 1), 0.5)
    return scaled.expand(-1, 3, -1, -1).permute(0, 2, 3, 1) if weights.shape[1] == 1 else scaled.permute(0, 2, 3, 1)


def _mosaic(filters: Tensor, columns: int) -> Tensor:
    """``filters`` (count, kh, kw, 3) side by side, ``columns`` a row, one white weight-pixel apart."""
    count, height, width, _ = filters.shape
    rows, columns = math.ceil(count / columns), min(columns, count)
    mosaic = torch.ones(rows * (height + 1) - 1, columns * (width + 1) - 1, 3)
    for index, image in enumerate(filters):
        top, left = (index // columns) * (height + 1), (index % columns) * (width + 1)
        mosaic[top : top + height, left : left + width] = image
    return mosaic


def plot_filters(
    filters: Mapping[str, Tensor | nn.Module] | Tensor | nn.Module,
    path: str | Path,
    title: str = "",
    max_filters: int = 64,
    columns: int = 16,
) -> None:
    """Draw convolution filters as small images: one panel per entry, each a grid of its filters.

    Each filter ``(in, kh, kw)`` becomes one small image, RGB for 3 input channels,
    gray for 1, min-max normalized to [0, 1] on its own (its lowest weight black, its
    highest white; a constant filter mid-gray), as filters are usually shown: the
    picture shows each filter's pattern, not its scale. Filters are in output-channel
    order, ``columns`` a row, each weight an integer number of pixels across (about
    ``FILTER_CELL_PIXELS`` a filter), one blank weight between filters. Writes ``path``
    (its suffix picks the type: PNG, PDF, SVG, ...) and returns nothing.

    Args:
        filters: weights ``(out, in, kh, kw)``, or a model (its first 2-d convolution,
            see ``first_convolution``), or a mapping of names (panel labels, e.g. samplers
            or models) to either; panels are drawn top to bottom in the mapping's order.
        path: the file to write.
        title: a title over all panels.
        max_filters: draw at most this many filters per panel (the first ones).
        columns: filters per grid row.

    Example:
        >>> plot_filters({"gaussian": net_a, "kmeans": net_b}, "filters.png", title="conv1")
    """
    if max_filters < 1 or columns < 1:
        raise MagicInitError(f"plot_filters: max_filters={max_filters}, columns={columns}; both must be at least 1")
    sources = filters if isinstance(filters, Mapping) else {"": filters}
    if not sources:
        raise MagicInitError("plot_filters: no filters given (an empty mapping)")
    panels: list[tuple[str, Tensor]] = []
    kernel = 1
    for name, source in sources.items():
        label, weights = _panel_weights(name, source)
        shown = weights[:max_filters]
        count = "" if len(shown) == len(weights) else f"first {len(shown)} of "
        label = f"{label}  ({count}{len(weights)} filters, {weights.shape[2]}x{weights.shape[3]})".lstrip()
        panels.append((label, _mosaic(_normalized(shown), columns)))
        kernel = max(kernel, *weights.shape[2:])
    require_matplotlib("plot_filters")
    from matplotlib.figure import Figure

    zoom = max(1, round(FILTER_CELL_PIXELS / kernel))  # screen pixels per weight
    width = max(_MIN_WIDTH, 2 * _MARGIN + zoom * max(mosaic.shape[1] for _, mosaic in panels))
    heights = [_LABEL_BAND + zoom * mosaic.shape[0] for _, mosaic in panels]
    height = 2 * _MARGIN + (_TITLE_BAND if title else 0) + sum(heights) + _PANEL_GAP * (len(panels) - 1)
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    if title:
        figure.text(0.5, 1 - _MARGIN / height, title, ha="center", va="top", fontsize=11)
    top = _MARGIN + (_TITLE_BAND if title else 0)  # pixels from the figure's top
    for (label, mosaic), panel_height in zip(panels, heights):
        figure.text(_MARGIN / width, 1 - (top + _LABEL_BAND - 4) / height, label, ha="left", va="bottom", fontsize=9)
        mosaic_height, mosaic_width = zoom * mosaic.shape[0], zoom * mosaic.shape[1]
        bottom = height - top - panel_height
        axis = figure.add_axes((_MARGIN / width, bottom / height, mosaic_width / width, mosaic_height / height))
        axis.imshow(mosaic.numpy(), interpolation="nearest", aspect="auto")
        axis.set_axis_off()
        top += panel_height + _PANEL_GAP
    figure.savefig(path, dpi=_DPI)
