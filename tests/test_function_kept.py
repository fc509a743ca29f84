"""Issue 25, part 1: "rescale_ keeps the function". Operations whose result depends on the scale of their
input (comparisons with constants) fix that scale; a rescaling that changes the outputs on any init sample
is undone, naming the operation; approximate mode never ends worse than the exact rescaling. Every check
measures the model's outputs itself."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import magicinit
from conftest import assert_untouched, state_copy
from magicinit._core.between import FLOAT64_CHECK_SAMPLES, FUNCTION_CHECK_SAMPLES


class Thresholded(nn.Module):
    """Three linear layers; the first one's output goes through a comparison (``how``)."""

    def __init__(self, how: str, threshold: float = 0.5) -> None:
        super().__init__()
        self.how, self.threshold = how, threshold
        self.first, self.second, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x)
        if self.how == "mask":
            hidden = hidden * (hidden > self.threshold)
        elif self.how == "where":
            hidden = torch.where(hidden > self.threshold, hidden, 0)
        elif self.how == "relu-like":
            hidden = hidden * (hidden > 0)
        elif self.how == "numpy":  # a comparison made outside torch: no trace sees it
            hidden = hidden * torch.from_numpy((hidden.detach().numpy() < self.threshold).astype(np.float32))
        elif self.how == "numpy-soft":  # a smooth gate made outside torch: any rescaling changes every sample
            hidden = hidden * torch.from_numpy(np.tanh(hidden.detach().numpy()))
        return self.head(self.second(hidden).relu())


def _initialized(how: str, data: torch.Tensor, threshold: float = 0.5) -> Thresholded:
    torch.manual_seed(0)
    model = Thresholded(how, threshold)
    magicinit.init_(model, data, seed=0, between=False)
    return model


def _relative_change(model: nn.Module, data: torch.Tensor, before: torch.Tensor) -> float:
    with torch.no_grad():
        after = model(data)
    return float((after - before).norm() / before.norm())


@pytest.mark.parametrize("how", ["mask", "where"])
def test_a_comparison_with_a_constant_fixes_the_scale_it_reads_and_the_function_is_kept(how: str) -> None:
    data = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    model = _initialized(how, data)
    with torch.no_grad():
        before = model(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report = magicinit.rescale_(model, data, seed=0)
    assert _relative_change(model, data, before) < 1e-5  # was 25-40 % when comparisons were invisible
    assert "comparison with 0.5" in (report["first"].output_scale_fixed_by or "")
    assert report["second"].weight_scale not in (None, 1.0)  # the scales the comparison leaves free are used


def test_a_comparison_with_zero_leaves_the_scale_free() -> None:
    data = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    model = _initialized("relu-like", data)
    with torch.no_grad():
        before = model(data)
    report = magicinit.rescale_(model, data, seed=0)
    assert report["first"].weight_scale not in (None, 1.0)
    assert _relative_change(model, data, before) < 1e-5


def test_a_threshold_crossed_only_beyond_the_checked_samples_is_caught_on_all_samples_and_undone() -> None:
    data = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
    data[:FUNCTION_CHECK_SAMPLES] *= 0.3  # the float64 and first own-precision checks never see it crossed
    model = _initialized("numpy", data, threshold=3.0)
    with torch.no_grad():
        crossing = (model.first(data) >= 3.0).any(1)
    assert not crossing[:FUNCTION_CHECK_SAMPLES].any() and crossing.sum() >= 5  # premise: only later samples cross
    saved = state_copy(model)
    with pytest.warns(RuntimeWarning, match=r"on all init samples.*first operation whose result changed is mul"):
        report = magicinit.rescale_(model, data, seed=0)
    assert_untouched(model, saved)
    assert report.output_change == 0.0  # the model computes what it did
    assert any("Part 2 was not kept" in note and "on all init samples" in note for note in report.notes)
    assert all(entry.status == "measured" for entry in report.layers)


def test_a_failed_float64_check_names_the_first_operation_that_changed() -> None:
    data = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    model = _initialized("numpy-soft", data)
    saved = state_copy(model)
    with pytest.warns(RuntimeWarning, match=r"float64 copy.*first operation whose result changed is mul"):
        report = magicinit.rescale_(model, data, seed=0)
    assert_untouched(model, saved)
    assert not any("not recognized. Please report" in note for note in report.notes)


def test_a_threshold_crossed_beyond_the_float64_samples_is_caught_in_the_models_own_precision() -> None:
    data = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    data[:FLOAT64_CHECK_SAMPLES] *= 0.05  # the float64 check's samples stay far below the threshold
    model = _initialized("numpy", data, threshold=0.5)
    with torch.no_grad():
        assert model.first(data[:FLOAT64_CHECK_SAMPLES]).abs().max() < 0.2  # the premise
        assert (model.first(data[:FUNCTION_CHECK_SAMPLES]) >= 0.5).any()  # later checked samples cross it
    saved = state_copy(model)
    with pytest.warns(RuntimeWarning, match=r"in the model's own precision.*first operation whose result changed"):
        report = magicinit.rescale_(model, data, seed=0)
    assert_untouched(model, saved)
    assert report.output_change == 0.0


def _lrn_net(alpha: float) -> nn.Sequential:
    torch.manual_seed(0)

    def lrn() -> nn.LocalResponseNorm:
        return nn.LocalResponseNorm(5, alpha=alpha, beta=0.75, k=1.0)

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), lrn(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), lrn(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


@pytest.mark.slow
def test_approximate_mode_never_ends_worse_than_the_exact_rescaling() -> None:
    data = 3 * torch.randn(128, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    models, outputs = {}, {}
    for mode in ("exact", "approximate"):
        models[mode] = _lrn_net(alpha=1e-2)
        magicinit.init_(models[mode], data, seed=0, between=False)
        with torch.no_grad():
            outputs[mode] = models[mode](data)
        report = magicinit.rescale_(models[mode], data, seed=0, scale_mode=mode)
    # its rounds ended at a 490x rate spread, 3 % output change, where the exact rescaling gives 19x: exact is kept
    assert any("the exact rescaling was applied instead" in note for note in report.notes)
    for (name, exact), approximate in zip(
        models["exact"].state_dict().items(), models["approximate"].state_dict().values()
    ):
        assert torch.equal(exact, approximate), name
    assert _relative_change(models["approximate"], data, outputs["approximate"]) < 1e-5


class NothingDetected(nn.Module):
    """A detector in miniature whose score threshold no init sample passes: its outputs are empty, so no
    gradient reaches any weight."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.score, self.box = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body(x)
        scores = self.score(hidden)
        return self.box(hidden)[scores > 1e6]


@pytest.mark.parametrize("mode", ["exact", "approximate"])
def test_when_no_gradient_reaches_any_layer_the_report_says_so_instead_of_rates(mode: str) -> None:
    torch.manual_seed(0)
    model = NothingDetected()
    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    saved = state_copy(model)
    report = magicinit.rescale_(model, data, seed=0, scale_mode=mode)
    assert_untouched(model, saved)
    assert any("no gradient reaches any layer" in note for note in report.notes)
    assert all(entry.rate_before is None and entry.status == "measured" for entry in report.layers)
    assert report.rate_spread_before is None
