"""Reports: table, JSON-able dict, diagnostics, progress bars."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import magicinit
from conftest import ResNetNoBN, plain_cnn


def test_report_table_and_dict() -> None:
    model = ResNetNoBN()
    report = magicinit.init_(model, torch.randn(16, 3, 8, 8), seed=0, rate_precision=0.1)
    table = str(report)
    for name in ("stem", "blocks.0.conv1", "blocks.1.conv2", "down", "shortcut", "head"):
        assert name in table
    for column in ("std before (mean/cv)", "mean/std after", "rate before", "rate after", "scale"):
        assert column in table
    assert "change-rate spread" in table
    data = json.loads(json.dumps(report.to_dict()))
    assert data["settings"]["seed"] == 0
    stem = next(layer for layer in data["layers"] if layer["name"] == "stem")
    assert stem["type"] == "Conv2d" and stem["shape"] == [8, 3, 3, 3] and stem["status"] == "initialized"
    assert len(stem["channel_std_after"]) == 8 and stem["std_cv_after"] < 1e-4
    assert stem["rate_before"] > 0 and stem["rate_after"] > 0 and stem["weight_scale"] > 0
    with pytest.raises(KeyError):
        report["nope"]


def test_diagnose_shows_what_part1_fixes() -> None:
    model = plain_cnn(6)
    x = torch.randn(32, 3, 8, 8) * 5
    before = magicinit.diagnose(model, x, rate_precision=0.1)
    magicinit.init_(model, x, between=False, seed=0)
    after = magicinit.diagnose(model, x, rate_precision=0.1)
    assert all(d.output_cv > 0.05 for d in before.layers)
    assert all(d.output_cv < 1e-4 for d in after.layers)
    assert all(abs(m) < 1e-4 for d in after.layers for m in d.channel_mean)
    assert "output CV" in str(after) and "rate mean" in str(after)
    assert json.loads(json.dumps(after.to_dict()))["layers"][0]["name"] == "0"


def test_progress_bars_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    x = torch.randn(8, 3, 8, 8)
    magicinit.init_(plain_cnn(3), x, seed=0, rate_precision=0.2)
    assert capsys.readouterr().err == ""
    magicinit.init_(plain_cnn(3), x, seed=0, progress=True, rate_precision=0.2)
    err = capsys.readouterr().err
    assert "magicinit: within-layer" in err and "magicinit: rates before" in err


def test_channel_moments_merge_exactly() -> None:
    from magicinit._core.stats import ChannelMoments

    x = torch.randn(40, 3, 5, 5, dtype=torch.float64) * 2 + 1
    whole = ChannelMoments.of(x.view(40, 3, -1))
    merged = ChannelMoments.of(x[:7].reshape(7, 3, -1)).merge(ChannelMoments.of(x[7:].reshape(33, 3, -1)))
    reference_var, reference_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    assert torch.allclose(whole.mean, reference_mean, rtol=1e-12)
    assert torch.allclose(whole.var, reference_var, rtol=1e-12)
    assert merged.count == whole.count
    assert torch.allclose(merged.mean, whole.mean, rtol=1e-12)
    assert torch.allclose(merged.std, whole.std, rtol=1e-12)


def test_a_layer_part2_cannot_equalize_says_why_in_exact_mode_too() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight.zero_()  # no gradient reaches layer 0 through it, and its own rate means nothing
    x = torch.randn(32, 6)
    for mode in ("exact", "approximate"):
        report = magicinit.init_(model, x, within=False, seed=0, scale_mode=mode)
        assert any(note == "not equalized: no gradient reaches it from the output" for note in report["0"].notes)
        assert any(note == "not equalized: its weight is zero" for note in report["2"].notes), (mode, report["2"])
