"""Part 2's table of operations (``operations.OPERATIONS``): one entry per operation, normalizations
declared by keyword names, and one compensation that Part 2 applies and the snapshot undoes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import magicinit
from conftest import interrupt_the_second_rate_measurement
from magicinit._core import operations as operations_module
from magicinit._core.operations import (
    OPERATIONS,
    NormalizationSpec,
    OperationSpec,
    call_argument,
    compensate_normalization,
)
from magicinit._core.safety import ModelSnapshot


class VarianceEpsilonRMSNorm(nn.Module):
    """An RMS norm in Hugging Face's style: its epsilon is the attribute ``variance_epsilon``."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)


def _net() -> nn.Sequential:
    """Two linear layers at uneven scales, then the norm (an epsilon large enough to matter), then a head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), VarianceEpsilonRMSNorm(16, eps=0.1), nn.Linear(16, 3)
    )
    with torch.no_grad():
        model[0].weight.mul_(4.0)
        model[2].weight.mul_(0.1)
    return model


# RMS norm, declared for modules whose epsilon is ``eps`` (torch's) or ``variance_epsilon``: the one entry.
_DECLARED = OperationSpec(normalization=NormalizationSpec((3, "eps"), None, eps_attributes=("eps", "variance_epsilon")))


def test_an_undeclared_epsilon_name_pins_the_norms_input() -> None:
    model, x = _net(), torch.randn(64, 8)
    eps = model[3].variance_epsilon
    report = magicinit.rescale_(model, x, seed=0, rate_precision=0.1, across_normalization=True)
    assert model[3].variance_epsilon == eps
    assert report.normalizations == {}
    reason = report["2"].output_scale_fixed_by  # the norm's input
    assert reason is not None and "rms_norm" in reason and "eps" in reason


def test_declaring_variance_epsilon_is_one_entry_and_part2_compensates_it(monkeypatch) -> None:
    monkeypatch.setitem(operations_module._OPERATIONS, "rms_norm", _DECLARED)  # the private table behind the view
    model, x = _net(), torch.randn(64, 8)
    eps = model[3].variance_epsilon
    with torch.no_grad():
        before = model(x)
    report = magicinit.rescale_(model, x, seed=0, rate_precision=0.1, across_normalization=True)
    with torch.no_grad():
        after = model(x)
    factor = report.normalizations["3"]["input_factor"]
    assert abs(math.log(factor)) > 0.1  # the norm's input scale moved ...
    assert model[3].variance_epsilon == pytest.approx(eps * factor**2, rel=1e-9)  # ... and its epsilon with it
    assert report.normalizations["3"]["eps"] == model[3].variance_epsilon
    kept = float((after - before).norm() / before.norm())  # the function is kept (measured here) ...
    with torch.no_grad():  # ... where without the compensation it would change
        compensated = model[3].variance_epsilon
        model[3].variance_epsilon = eps
        uncompensated = model(x)
        model[3].variance_epsilon = compensated
    assert kept < 1e-5 and float((uncompensated - before).norm() / before.norm()) > 100 * max(kept, 1e-7)


def test_the_snapshot_restores_a_declared_epsilon(monkeypatch) -> None:
    monkeypatch.setitem(operations_module._OPERATIONS, "rms_norm", _DECLARED)  # the private table behind the view
    model = _net()
    snapshot = ModelSnapshot(model)
    compensate_normalization(model[3], math.log(3.0), operations_module.Normalization(0, "variance_epsilon"))
    assert model[3].variance_epsilon == pytest.approx(0.9)
    snapshot.restore()
    assert model[3].variance_epsilon == 0.1


def test_an_interrupt_after_part2_compensated_restores_the_declared_epsilon(monkeypatch) -> None:
    monkeypatch.setitem(operations_module._OPERATIONS, "rms_norm", _DECLARED)  # the private table behind the view
    calls = interrupt_the_second_rate_measurement(monkeypatch)
    model, x = _net(), torch.randn(64, 8)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    with pytest.raises(KeyboardInterrupt):
        magicinit.rescale_(model, x, seed=0, rate_precision=0.1, verify_rates=True, across_normalization=True)
    assert len(calls) == 2
    assert model[3].variance_epsilon == 0.1
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_compensation_scales_eps_and_running_statistics() -> None:
    norm = nn.BatchNorm1d(4).eval()
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(16, 4)
    with torch.no_grad():
        before = norm(x)
    spec = OPERATIONS["batch_norm"].normalization
    args = (x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.1, norm.eps)
    assert spec is not None and spec.compensation_problem(norm, args, {}) is None
    compensate_normalization(norm, math.log(2.5), spec.compensated(0, norm, args, {}))
    with torch.no_grad():
        after = norm(2.5 * x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_call_argument_reads_by_position_or_keyword() -> None:
    assert call_argument((1, 2, 3), {}, (1, "b")) == 2
    assert call_argument((1,), {"b": 5}, (1, "b")) == 5
    assert call_argument((1,), {}, (1, "b"), default=7) == 7
    assert call_argument((1, 2), {}, None, default=7) == 7


def test_every_entry_is_consistent() -> None:
    # what lets a concatenation's slices through is homogeneous; normalizations have no other rule
    for name, spec in OPERATIONS.items():
        if spec.slice_wise or spec.channel_wise or spec.concatenation:
            assert spec.rule is not operations_module._pin, name
        if spec.normalization is not None:
            assert spec.rule is operations_module._pin and not spec.slice_wise and not spec.channel_wise, name
    # names ``sites.op_name`` never produces have no entry (it turns ``concat`` into ``cat``)
    assert "concat" not in OPERATIONS and "concatenate" not in OPERATIONS
