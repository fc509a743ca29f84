"""Part 2: change rates equalized, function kept, graphs, non-homogeneous operations."""

from __future__ import annotations

import math
import threading
import warnings

import pytest
import torch
from torch import nn

import magicinit
from conftest import (
    ConcatNet,
    Conv1d3dNet,
    ResNetNoBN,
    assert_same_state,
    geometric_spread,
    plain_cnn,
    rescale_keeping_function,
    state_copy,
)
from magicinit._core import graph as graph_module
from magicinit._core import operations as operations_module
from magicinit._core.adapters import find_affine_layers
from magicinit._core.inputs import default_forward
from magicinit._core.sites import UnitIndex
from magicinit._core.solve import solve_scales


def _rates(model: nn.Module, x: torch.Tensor, seed: int) -> dict[str, float]:
    """Change rates re-measured with fresh noise (another seed) and tight precision."""
    return {d.name: d.rate for d in magicinit.diagnose(model, x, seed=seed, rate_precision=0.01).layers}


def _with_uneven_scales(model: nn.Module) -> nn.Module:
    """A 'trained' model: every layer at its own arbitrary scale."""
    with torch.no_grad():
        for i, module in enumerate(find_affine_layers(model).values()):
            module.weight.mul_(3.0 ** ((-1) ** i * (i % 3)))
    return model


@pytest.mark.parametrize("activation", [nn.ReLU, lambda: nn.LeakyReLU(0.2)])
def test_chain_rates_end_within_ten_percent_and_function_is_kept(activation) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        activation(),
        nn.Conv2d(8, 8, 3, padding=1),
        activation(),
        nn.MaxPool2d(2),
        nn.Dropout(0.3),
        nn.Conv2d(8, 16, 3, padding=1),
        activation(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 16, 16),
        activation(),
        nn.Linear(16, 5),
    ).eval()  # dropout off for the before/after comparison (magicinit's own passes run in eval mode)
    x = torch.randn(64, 3, 16, 16)
    magicinit.init_(model, x, between=False, seed=0)
    report = rescale_keeping_function(model, x, seed=1)
    assert report.rate_spread_before > 2  # there was something to equalize
    rates = _rates(model, x, seed=99)
    assert geometric_spread(list(rates.values())) < 0.10, rates


def test_init_with_both_parts_on_plain_cnn_and_report_figures() -> None:
    model = plain_cnn(8)
    x = torch.randn(48, 3, 12, 12)
    report = magicinit.init_(model, x, seed=0)
    assert report.output_change is not None and report.output_change < 1e-4
    rates = _rates(model, x, seed=5)
    assert geometric_spread(list(rates.values())) < 0.10
    assert report.rate_spread_after < 1.15 < report.rate_spread_before
    for entry in report.layers:
        assert entry.rate_before_log_error is not None and entry.rate_before_log_error < 0.03
        assert entry.weight_scale is not None and entry.weight_scale > 0


def test_rescale_of_trained_model_keeps_function_and_equalizes() -> None:
    model = _with_uneven_scales(plain_cnn(6))
    x = torch.randn(48, 3, 12, 12)
    rescale_keeping_function(model, x, seed=0)
    assert geometric_spread(list(_rates(model, x, seed=3).values())) < 0.10


@pytest.mark.parametrize("build,shape", [(ResNetNoBN, (3, 8, 8)), (ConcatNet, (3, 8, 8)), (Conv1d3dNet, (2, 6, 4, 4))])
def test_graph_with_sums_or_concat_keeps_function_and_reaches_the_solved_rates(build, shape) -> None:
    model = _with_uneven_scales(build())
    x = torch.randn(48, *shape)
    report = rescale_keeping_function(model, x, seed=0)
    assert report.rate_spread_after <= report.rate_spread_before
    # rates measured afresh are those the scaling law predicts: C_k / (weight factor)^2
    predicted = {e.name: e.rate_before / e.weight_scale**2 for e in report.layers}
    for name, rate in _rates(model, x, seed=11).items():
        assert rate == pytest.approx(predicted[name], rel=0.08), name


def test_solver_on_a_chain_is_exact_and_keeps_fixed_layers() -> None:
    model = plain_cnn(5)
    layers = find_affine_layers(model)
    graph = graph_module.trace_graph(model, torch.randn(2, 3, 8, 8), default_forward, UnitIndex(model))
    log_rates = {name: float(i * i) for i, name in enumerate(layers)}
    solution = solve_scales(graph, log_rates)
    values = list(solution.predicted_log_rate.values())
    assert max(values) - min(values) < 1e-9
    fixed = next(iter(layers))
    solution = solve_scales(graph, {n: r for n, r in log_rates.items() if n != fixed}, fixed=[fixed])
    assert solution.weight_factor(fixed) == 1.0
    values = list(solution.predicted_log_rate.values())
    assert max(values) - min(values) < 1e-9  # a chain with its first layer fixed is still exact


def test_residual_block_scale_constraints() -> None:
    model = ResNetNoBN(blocks=1)
    layers = find_affine_layers(model)
    graph = graph_module.trace_graph(model, torch.randn(2, 3, 8, 8), default_forward, UnitIndex(model))
    solution = solve_scales(graph, {name: 0.0 for name in layers} | {"blocks.0.conv1": 2.0})
    # the sum ties the block's output to its input: conv2 writes where the stem writes
    assert solution.rho_out["blocks.0.conv2"] == pytest.approx(solution.rho_out["stem"])
    assert solution.rho_out["down"] == pytest.approx(solution.rho_out["shortcut"])


@pytest.mark.parametrize("activation", [nn.Tanh, nn.Sigmoid, nn.GELU])
def test_non_homogeneous_activations_pin_scales_and_keep_function(activation) -> None:
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), activation(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    x = torch.randn(64, 6)
    report = rescale_keeping_function(model, x, seed=0, rate_precision=0.05)
    name = activation.__name__.lower() if activation is not nn.GELU else "gelu"
    assert any(f"output scale fixed by {name} in '3'" in n for n in report["2"].notes), report["2"].notes
    assert any(f"input scale fixed by {name} in '3'" in n for n in report["4"].notes)
    # layers 0 and 2 share the one free scale between them; layer 4 and 6 likewise
    assert report["0"].weight_scale * report["2"].weight_scale == pytest.approx(1.0)


def test_local_response_norm_and_batch_norm_are_reported() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.LocalResponseNorm(3),
        nn.Conv2d(8, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16, 2),
    )
    report = magicinit.init_(model, torch.randn(16, 3, 8, 8), seed=0, rate_precision=0.05)
    assert any("local_response_norm in '2'" in n for n in report["0"].notes)
    assert report["3"].output_scale_fixed_by == "batch_norm in '4' (across_normalization=False)"
    report = magicinit.init_(model, torch.randn(16, 3, 8, 8), seed=0, rate_precision=0.05, across_normalization=True)
    assert report["3"].output_scale_fixed_by is None  # the batch norm compensates its input's scale
    assert report["7"].input_scale_fixed_by == "batch_norm in '4'"  # and fixes its output's


def test_frozen_and_skipped_layers_are_left_bit_identical() -> None:
    model = plain_cnn(5)
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    skipped = model[4].weight.detach().clone()
    report = magicinit.init_(model, torch.randn(32, 3, 8, 8), seed=0, skip=["4"], rate_precision=0.05)
    assert torch.equal(model[0].weight, frozen) and torch.equal(model[4].weight, skipped)
    assert report["0"].status == "excluded" and "frozen" in report["0"].notes[0]
    assert report["4"].status == "excluded" and "skipped" in report["4"].notes[0]
    assert not model[0].weight.requires_grad


class _Uncopyable(nn.Sequential):
    """A model deepcopy cannot copy (it holds a lock), so no float64 twin can be made."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.lock = threading.Lock()


@pytest.mark.parametrize("container", [nn.Sequential, _Uncopyable])
def test_a_rescaling_that_would_change_the_function_is_not_kept(monkeypatch, container) -> None:
    # Fault injection: declare tanh (wrongly) homogeneous, so Part 2 would scale across it.
    monkeypatch.setitem(operations_module._OPERATIONS, "tanh", operations_module.OPERATIONS["relu"])
    model = _with_uneven_scales(container(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)))
    x = torch.randn(32, 4)
    saved = state_copy(model)
    with pytest.warns(RuntimeWarning, match="left as it was"):
        report = magicinit.rescale_(model, x, seed=0, rate_precision=0.1)
    assert_same_state(model, saved)
    assert any("not kept" in note for note in report.notes)


def test_deep_float32_net_is_rescaled_despite_rounding() -> None:
    # 31 float32 layers: rounding alone moves the output by ~1e-4, the float64 check sees ~1e-13
    model = plain_cnn(32, width=4)
    x = torch.randn(32, 3, 12, 12)
    magicinit.init_(model, x, between=False, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = magicinit.rescale_(model, x, seed=0, rate_precision=0.05)
    assert report.rate_spread_after < 1.3 < report.rate_spread_before
    assert report.output_change < 1e-2


def test_rates_have_no_side_effects_on_grads_or_global_rng() -> None:
    model = plain_cnn(4)
    x = torch.randn(16, 3, 8, 8)
    rng = torch.get_rng_state()
    diagnosis = magicinit.diagnose(model, x, rate_precision=0.1)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    assert all(math.isfinite(d.rate) and d.rate > 0 for d in diagnosis.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        magicinit.init_(model, x, seed=0, rate_precision=0.1)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bias", [True, False])
def test_shared_layer_is_scaled_alike_at_every_call_and_function_kept(bias: bool) -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.shared = nn.Linear(8, 8, bias=bias)
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.shared(torch.relu(self.inp(x))))
            return self.out(torch.relu(self.shared(h)))

    model = _with_uneven_scales(Shared())
    x = torch.randn(48, 4)
    report = rescale_keeping_function(model, x, seed=0, rate_precision=0.05)
    assert report["shared"].calls == 2 and report.rate_spread_after < report.rate_spread_before


class BilinearNet(nn.Module):
    """Two branches multiplied by ``nn.Bilinear`` (``x1^T W x2 + b``), then a head."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)
        self.bilinear = nn.Bilinear(8, 8, 8, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bilinear(torch.relu(self.a(x)), torch.relu(self.b(x)))))


@pytest.mark.parametrize("bias", [True, False])
def test_bilinear_branches_trade_scale_and_function_is_kept(bias: bool) -> None:
    """With a bias, the output of ``x1^T W x2 + b`` is fixed and its inputs may only trade scale
    (rho_1 + rho_2 = 0); without one, the scales add. Either way the function is kept, with no warning."""
    model, x = _with_uneven_scales(BilinearNet(bias)), torch.randn(64, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = rescale_keeping_function(model, x, seed=0)
    assert report.rate_spread_after < report.rate_spread_before
    assert report["a"].weight_scale != 1.0 and report["b"].weight_scale != 1.0
    if bias:  # the two branches' output scales cancel in the product
        assert math.isclose(report["a"].weight_scale * report["b"].weight_scale, 1.0, rel_tol=1e-9)


def test_a_float64_model_is_rescaled_once_by_the_reported_factors() -> None:
    """The float64 check works on a copy: for a float64 model, a copy too (not the model's own tensors)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)
    ).double()
    with torch.no_grad():
        net[0].weight.mul_(10)
        net[5].weight.mul_(0.1)
    x = torch.randn(32, 3, 8, 8, dtype=torch.float64)
    before = net(x).detach()
    weights = {name: net.get_submodule(name).weight.detach().clone() for name in ("0", "2", "5")}
    report = magicinit.rescale_(net, x, seed=0)
    for name, weight in weights.items():
        factor = report[name].weight_scale
        assert factor is not None
        torch.testing.assert_close(net.get_submodule(name).weight.detach(), weight * factor, rtol=1e-12, atol=0)
    assert report["0"].weight_scale < 0.5  # a real rescaling, which applied twice would show above
    torch.testing.assert_close(net(x).detach(), before, rtol=1e-10, atol=1e-12)
