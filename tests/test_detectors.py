"""The guide's detector recipe (docs/guide.md, Detectors) on torchvision's Faster R-CNN (MobileNetV3-320 FPN),
RetinaNet (ResNet-50 FPN) and SSDlite (MobileNetV3), with random weights and small images, offline; and what
``init_`` says on a detector without it.

The recipe's ``forward`` returns the heads' raw outputs, before anchor decoding, score thresholds, top-k and NMS.
Everything is measured here independently of magicinit's report: each layer's first output on the init data
through forward hooks, the raw outputs with Part 2 against those of Part 1 alone (same seed), gradients by
``backward``, and the detector's own eval forward afterwards.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import magicinit
from conftest import AFFINE, assert_no_trace, assert_unit_channels, channel_stats

detection = pytest.importorskip("torchvision.models.detection")

# squeeze-excitation layers (MobileNetV3) and RetinaNet's P7 see a few values per channel and image: expected
# with a few small images
pytestmark = pytest.mark.filterwarnings(r"ignore:.*fewer than \d+ values per channel:UserWarning")

# the guide's recipe, run as written: bench/zoo_models.py reads the block (the zoo times the same forward)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from zoo_models import build as build_spec  # noqa: E402
from zoo_models import detector_recipe as recipe  # noqa: E402
from zoo_models import spec  # noqa: E402


def ssdlite(size: int) -> nn.Module:
    """SSDlite with its fixed input size (320 px) set to ``size``: its anchors follow the feature maps."""
    model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5)
    model.transform.min_size, model.transform.max_size, model.transform.fixed_size = (size,), size, (size, size)
    return model


# name: (builder, image size, init samples); all with random weights, 5 classes
DETECTORS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "fasterrcnn": (
        lambda: detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, num_classes=5, min_size=128, max_size=128
        ),
        128,
        8,
    ),
    "retinanet": (
        lambda: detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=5, min_size=128, max_size=128
        ),
        128,
        4,
    ),
    "ssdlite": (lambda: ssdlite(160), 160, 8),
}


def build(name: str) -> tuple[nn.Module, Tensor]:
    """The detector (seeded random weights) and its init images."""
    builder, size, samples = DETECTORS[name]
    torch.manual_seed(0)
    model = builder()
    return model, torch.rand(samples, 3, size, size, generator=torch.Generator().manual_seed(1))


def first_call_outputs(model: nn.Module, forward: Callable[[nn.Module, Tensor], Any], images: Tensor) -> dict:
    """Every conv/linear layer's output at its first call in ``forward(model, images)``, eval mode, no grad."""
    outputs: dict[str, Tensor] = {}

    def keep(name: str, output: Tensor) -> None:  # returns None: the output is left as it is
        outputs.setdefault(name, output.detach().clone())

    handles = [
        module.register_forward_hook(lambda m, a, o, n=name: keep(n, o))
        for name, module in model.named_modules()
        if isinstance(module, AFFINE)
    ]
    training = model.training
    try:
        with torch.no_grad():
            forward(model.eval(), images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return outputs


def raw_outputs(model: nn.Module, images: Tensor, forward: Callable[[nn.Module, Tensor], Any]) -> list[Tensor]:
    training = model.training
    try:
        with torch.no_grad():
            return [t.double() for t in forward(model.eval(), images)]
    finally:
        model.train(training)


def relative_difference(outputs: list[Tensor], reference: list[Tensor]) -> float:
    assert [t.shape for t in outputs] == [t.shape for t in reference]
    change = sum(float((a - b).square().sum()) for a, b in zip(outputs, reference))
    return math.sqrt(change / sum(float(b.square().sum()) for b in reference))


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[pytest.mark.slow] if name == "retinanet" else []) for name in DETECTORS]
)
def test_the_recipe_returns_raw_outputs_stacked_along_the_images_that_every_layer_feeds(name: str) -> None:
    """Tensors with one row per image (so rates come from one batched pass), through which a gradient reaches
    every conv and linear layer of backbone, FPN and heads."""
    raw_head_outputs = recipe()["raw_head_outputs"]
    model, images = build(name)
    model.eval()
    outputs = raw_head_outputs(model, images[:2])
    assert outputs and all(isinstance(t, Tensor) and t.shape[0] == 2 and t.requires_grad for t in outputs)
    noise = torch.Generator().manual_seed(2)
    torch.autograd.backward(outputs, [torch.randn(t.shape, generator=noise) for t in outputs])
    affine = {n: m for n, m in model.named_modules() if isinstance(m, AFFINE)}
    assert len(affine) > 50
    no_gradient = [n for n, m in affine.items() if m.weight.grad is None or not m.weight.grad.abs().sum() > 0]
    assert not no_gradient


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DETECTORS))
def test_init_with_the_recipe(name: str) -> None:
    """Every layer initialized and measured; on the init data, Part 1 alone gives every channel std 1 (mean
    beta where there is a bias); Part 2 rescales whole layers and keeps the raw outputs to rounding; the
    detector's own eval forward still gives detections."""
    raw_head_outputs = recipe()["raw_head_outputs"]
    model, images = build(name)
    options: dict[str, Any] = dict(seed=0, samples=len(images), forward=raw_head_outputs, rate_max_rounds=4)
    report = magicinit.init_(model, images, **options)
    assert_no_trace(model)
    affine = [n for n, m in model.named_modules() if isinstance(m, AFFINE)]
    assert [entry.name for entry in report.layers] == affine
    assert all(entry.status == "initialized" for entry in report.layers)
    assert all(entry.rate_before is not None and 0 < entry.rate_before < math.inf for entry in report.layers)

    part1, _ = build(name)
    part1_report = magicinit.init_(part1, images, **options, between=False)
    # Part 1, measured here: std 1 on every live channel, mean beta (0) where the layer has a bias
    outputs = first_call_outputs(part1, raw_head_outputs, images)
    modules = dict(part1.named_modules())
    assert set(outputs) == set(affine)
    for entry in part1_report.layers:
        mean, std = channel_stats(modules[entry.name], outputs[entry.name])
        live = torch.ones_like(std, dtype=torch.bool)
        live[entry.zero_variance_channels] = False
        assert torch.allclose(std[live], torch.ones_like(std[live]), atol=1e-3), entry.name
        if modules[entry.name].bias is not None:
            assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-3), entry.name
    # Part 2 keeps the raw outputs: they differ from Part 1's by what float32 rounding does to them (the
    # difference between Part 1's outputs in float32 and float64), and by at most 1e-4 where that is smaller
    reference, part1_64 = raw_outputs(part1, images, raw_head_outputs), _float64(part1, name)
    floor = relative_difference(reference, raw_outputs(part1_64, images.double(), raw_head_outputs))
    tolerance = max(1e-4, 3 * floor)
    # Part 2 multiplies each layer's channels by one factor: the channel stds stay equal within each layer, to
    # 2e-3 or, where rounding moves them more (SSDlite's last layers), to 3 times what float32 rounding does to
    # Part 1's channel stds (against float64)
    outputs = first_call_outputs(model, raw_head_outputs, images)
    outputs_64 = first_call_outputs(part1_64, raw_head_outputs, images.double())
    part1_outputs = first_call_outputs(part1, raw_head_outputs, images)
    for entry in report.layers:
        (_, std), (_, std_part1), (_, std_64) = (
            channel_stats(modules[entry.name], found[entry.name]) for found in (outputs, part1_outputs, outputs_64)
        )
        live = torch.ones_like(std, dtype=torch.bool)
        live[entry.zero_variance_channels] = False
        rounding = float(((std_part1 - std_64)[live].abs() / std_64[live]).max())
        deviation = float((std[live] / std[live].median() - 1).abs().max())
        assert deviation <= max(2e-3, 3 * rounding), (entry.name, deviation, rounding)
    assert report.output_change is not None and report.output_change <= tolerance
    assert relative_difference(raw_outputs(model, images, raw_head_outputs), reference) <= tolerance
    # and Part 2 was kept (not undone as if the rescaling changed the function): the layers whose weights
    # moved from Part 1's are those the report says it rescaled, and there are some
    assert not any("Part 2 was not kept" in note for note in report.notes), report.notes
    moved = _moved_weights(model, part1, affine)
    assert moved and moved == {e.name for e in report.layers if e.weight_scale not in (None, 1.0)}

    # the detector's own forward: detections as before
    with torch.no_grad():
        detections = model.eval()(list(images[:2]))
    assert len(detections) == 2
    for found in detections:
        assert found["boxes"].shape[1:] == (4,) and found["boxes"].shape[0] == found["scores"].shape[0]
        assert torch.isfinite(found["boxes"]).all() and torch.isfinite(found["scores"]).all()


@pytest.mark.slow
def test_a_rescaling_is_kept_where_a_later_sample_rounds_worse_than_the_first_two() -> None:
    """bench/zoo.py's SSDlite row (91 classes, 160 px, 8 uniform images): after Part 1 the raw outputs of
    one image round 100 times worse than those of the first two, on which the float64 check measures the
    rounding; the own-precision check measures it on all checked samples before it undoes anything, so
    Part 2 is kept, and it keeps the outputs to what rounding does to them."""
    zoo_ssdlite = spec("ssdlite320_mobilenet_v3_large")
    images, forward = zoo_ssdlite.inputs(8), zoo_ssdlite.forward
    options: dict[str, Any] = dict(seed=0, across_normalization=True, forward=forward)
    part1 = build_spec(zoo_ssdlite)
    magicinit.init_(part1, images, **options, between=False)
    twin = build_spec(zoo_ssdlite)
    twin.load_state_dict(part1.state_dict())
    twin = twin.double()

    def rounding(batch: Tensor) -> float:
        return relative_difference(raw_outputs(part1, batch, forward), raw_outputs(twin, batch.double(), forward))

    # the premise, measured here: the first two images round far better than the batch
    floor = rounding(images)
    assert floor > 10 * rounding(images[:2]), (floor, rounding(images[:2]))
    model = build_spec(zoo_ssdlite)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "would change the network's output" warning
        report = magicinit.init_(model, images, **options)
    assert not any("Part 2 was not kept" in note for note in report.notes), report.notes
    affine = [n for n, m in model.named_modules() if isinstance(m, AFFINE)]
    moved = _moved_weights(model, part1, affine)
    assert len(moved) > len(affine) // 2
    assert moved == {e.name for e in report.layers if e.weight_scale not in (None, 1.0)}
    reference = raw_outputs(part1, images, forward)
    assert relative_difference(raw_outputs(model, images, forward), reference) <= 3 * floor


def _moved_weights(model: nn.Module, before: nn.Module, layers: list[str]) -> set[str]:
    """The layers whose weight in ``model`` differs from that in ``before`` (a copy of it as it was)."""
    weight = "{}.weight".format
    return {n for n in layers if not torch.equal(model.get_parameter(weight(n)), before.get_parameter(weight(n)))}


def _float64(model: nn.Module, name: str) -> nn.Module:
    """A float64 copy of ``model`` (a fresh build with its state)."""
    twin, _ = build(name)
    twin.load_state_dict(model.state_dict())
    return twin.double()


@pytest.mark.slow
def test_without_the_recipe_no_gradient_is_said_when_no_detection_passes() -> None:
    """Faster R-CNN's own eval forward, where no box passes the score threshold: its outputs are empty, no
    gradient reaches any layer, and the report says so instead of giving rates. Part 1 still normalizes every
    layer on that forward (the RPN head at its first level)."""
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=128, max_size=128, box_score_thresh=1.0
    )
    images = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    report = magicinit.init_(model, images, seed=0, samples=4, rate_max_rounds=2)
    assert any("no gradient reaches any layer" in note and "forward=" in note for note in report.notes)
    assert report.rate_spread_before is None and report.rate_spread_after is None and report.output_change is None
    assert all(entry.rate_before is None and entry.rate_after is None for entry in report.layers)
    assert not any("(relative, rounding)" in note for note in report.notes)
    with torch.no_grad():
        assert all(found["boxes"].shape == (0, 4) for found in model.eval()(list(images)))
    assert_unit_channels(model, images, report, atol=1e-3)  # the model's own forward (eval mode)


def detections_of(model: nn.Module, images: Tensor) -> list[Tensor]:
    """The detector's own eval outputs (boxes and scores of every image), float64."""
    with torch.no_grad():
        found = model.eval()(list(images))
    return [found_one[key].double() for found_one in found for key in ("boxes", "scores")]


@pytest.mark.slow
def test_without_the_recipe_changed_detections_are_not_kept_as_rounding() -> None:
    """Faster R-CNN's own eval forward (detections after thresholds, top-k and NMS): in exact mode the
    detections after ``init_`` are those of Part 1 alone (same seed) to rounding, or the rescaling is not kept;
    a larger change is never reported as rounding."""
    builder = DETECTORS["fasterrcnn"][0]
    images = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = builder()
    report = magicinit.init_(model, images, seed=0, samples=4, rate_max_rounds=2)
    torch.manual_seed(0)
    part1 = builder()
    magicinit.init_(part1, images, seed=0, samples=4, between=False)
    rounding = [note for note in report.notes if "(relative, rounding)" in note]
    assert not (rounding and report.output_change is not None and report.output_change > 1e-3), rounding
    after, reference = detections_of(model, images), detections_of(part1, images)
    assert [t.shape for t in after] == [t.shape for t in reference]
    assert relative_difference(after, reference) <= 1e-3
