"""torchvision's classifiers: initialized without error, a valid report, finite outputs.

torchvision is in the test extra (constraints.txt pins it); these tests are
skipped, with a reason, where it is missing. README ("The torchvision model
zoo") tabulates what each model gets; ``bench/zoo.py`` regenerates that table.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import magicinit
from conftest import AFFINE, channel_stats, first_call_outputs
from magicinit.tools.cli import load_model
from magicinit.tools.nets import TORCHVISION_CLASSIFIERS

pytest.importorskip("torchvision")

FAST = {"squeezenet1_1"}  # the one classifier of the fast lane (-m "not slow"): the others take 5-70 s each


def build(name: str) -> nn.Module:
    """The model as the command line's ``torchvision:NAME`` builds it (no pretrained weights), seeded."""
    torch.manual_seed(0)
    return load_model(f"torchvision:{name}", {})


@pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet")
@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[] if name in FAST else pytest.mark.slow) for name in TORCHVISION_CLASSIFIERS]
)
def test_torchvision_classifier_is_initialized_with_a_valid_report(name: str) -> None:
    model = build(name)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    affine = [n for n, m in model.named_modules() if isinstance(m, AFFINE)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "rescaling would change the output", no other warning
        # across_normalization: Part 2 through every batch/layer norm, the hardest graph to get right
        report = magicinit.init_(model, x, seed=0, rate_precision=0.2, across_normalization=True)

    assert [layer.name for layer in report.layers] == affine
    assert report.rate_spread_before is not None and report.rate_spread_after is not None
    # efficientnet_b0's float32 forward amplifies rounding (see below): a rescaling exact in
    # float64 (its twin check passed, or a warning would have failed this test) moves it by ~4e-3
    assert report.output_change is not None and report.output_change < (1e-2 if name == "efficientnet_b0" else 1e-3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model.eval()(x)).all()
    outputs = first_call_outputs(model, x)
    modules = dict(model.named_modules())
    for layer in report.layers:
        if layer.status == "never called":  # googlenet's auxiliary heads run in training mode only
            assert name == "googlenet" and ".aux" in f".{layer.name}" and layer.name not in outputs
            continue
        assert layer.status == "initialized", (layer.name, layer.status, layer.notes)
        assert layer.rate_before is not None and layer.rate_after is not None
        # Part 1 gave every channel the same std, and Part 2 scales a layer's channels alike.
        # Up to rounding: efficientnet_b0 amplifies float32 rounding along its depth (its
        # float32 forward is 1e-3 away from float64 at the classifier; with its batch norms'
        # inputs rescaled by Part 2, float32 channel stds move by up to 1.2e-2 where float64
        # ones move by 1e-11), so 2e-2 there and 1e-2 elsewhere; a wrong normalization is an
        # O(1) spread.
        live = [c for c in range(len(layer.channel_std_after)) if c not in layer.zero_variance_channels]
        _, std = channel_stats(modules[layer.name], outputs[layer.name])
        std = std[live]
        assert float((std / std.mean() - 1).abs().max()) < (2e-2 if name == "efficientnet_b0" else 1e-2), layer.name
        fixed = layer.input_scale_fixed_by is not None and layer.output_scale_fixed_by is not None
        if fixed:
            assert layer.weight_scale == 1.0, layer.name
