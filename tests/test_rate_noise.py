"""The change rates' noise (Rademacher) and the first round's error bound, against rates computed here.

Rademacher noise has the second moment of Gaussian noise, so the rates are the same quantity; for the
layer at the output it has no variance at all, which a closed form checks exactly. The one-round stop is
checked against an independent estimate from plain autograd with many Gaussian draws per sample.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import magicinit
from conftest import noise_rates
from magicinit._core.rates import measure
from magicinit._core.rates.measure import ONE_ROUND_MIN_DRAWS, _next_draws


def test_the_output_layer_is_measured_exactly_by_one_draw_per_sample() -> None:
    # y = W x: for one sample the gradient is eta x^T, whose squared norm is ||eta||^2 ||x||^2; with
    # entries of +-1, ||eta||^2 is the number of outputs in every draw (Gaussian noise would scatter it)
    torch.manual_seed(0)
    layer, x = nn.Linear(6, 4), torch.randn(40, 6)
    expected = math.sqrt(4 * float(x.square().sum(1).mean()) / float(layer.weight.square().sum()))
    diagnosis = magicinit.diagnose(layer, x, seed=3)
    assert diagnosis.layers[0].rate == pytest.approx(expected, rel=1e-6)


def _independent_rates(model: nn.Module, x: torch.Tensor, draws_per_sample: int) -> dict[str, float]:
    """``sqrt(E||dL/dW||^2 / ||W||^2)`` with Gaussian noise on one sample at a time, plain autograd."""
    weights = {
        name: module.weight for name, module in model.named_modules() if isinstance(module, nn.Conv2d | nn.Linear)
    }
    totals = dict.fromkeys(weights, 0.0)
    generator = torch.Generator().manual_seed(123)
    for sample in x:
        output = model(sample[None])
        for _ in range(draws_per_sample):
            noise = torch.randn(output.shape, generator=generator)
            grads = torch.autograd.grad(output, list(weights.values()), noise, retain_graph=True)
            for name, grad in zip(weights, grads):
                totals[name] += float(grad.square().sum())
    count = len(x) * draws_per_sample
    return {name: math.sqrt(totals[name] / count / float(w.square().sum())) for name, w in weights.items()}


def _plain(depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def test_one_round_stops_where_its_bound_meets_the_precision_and_the_rates_agree() -> None:
    torch.manual_seed(0)
    model, x = _plain(4), torch.randn(256, 3, 6, 6)
    diagnosis = magicinit.diagnose(model, x, seed=0, rate_precision=0.05)
    assert diagnosis.draws == 256  # one round of one draw per sample
    assert all(layer.rate_log_error <= 0.05 for layer in diagnosis.layers)
    independent = _independent_rates(model, x, draws_per_sample=8)
    for layer in diagnosis.layers:
        # the bound is an upper bound of the noise error; the independent estimate has error ~0.05/sqrt(8)
        assert abs(math.log(layer.rate / independent[layer.name])) <= 3 * 0.05, layer.name


def test_a_second_round_is_made_below_the_draws_the_bound_needs_or_where_it_misses() -> None:
    torch.manual_seed(0)
    model = _plain(4)
    few = magicinit.diagnose(model, torch.randn(ONE_ROUND_MIN_DRAWS - 1, 3, 6, 6), seed=0, rate_precision=10.0)
    assert few.draws == 2 * (ONE_ROUND_MIN_DRAWS - 1)  # a loose target, but too few draws to trust their spread
    tight = magicinit.diagnose(model, torch.randn(256, 3, 6, 6), seed=0, rate_precision=1e-3, rate_max_rounds=3)
    assert tight.draws == 3 * 256


def test_samples_that_weigh_more_get_more_draws_and_the_rates_stay_unbiased() -> None:
    # two samples of 64 are 8 times larger: they hold most of every hidden layer's squared gradient norm,
    # so drawing every sample alike needs many rounds; after two, the draws go where the weight is
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )  # fmt: skip
    x = torch.randn(64, 3, 6, 6)
    x[:2] *= 8
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    independent = noise_rates(model, x, weights, rounds=100, seed=5)
    for seed in (0, 1):
        diagnosis = magicinit.diagnose(model, x, seed=seed, rate_precision=0.02, rate_max_rounds=6)
        # every chunk drawn alike misses 0.02 in 6 rounds (384 draws: errors up to 0.024)
        assert diagnosis.draws < 6 * 64
        for layer in diagnosis.layers:
            assert layer.rate_log_error <= 0.02, layer.name
            # the independent estimate (Gaussian noise, 6 400 draws) has an error of about 0.01 itself
            assert abs(math.log(layer.rate / independent[layer.name])) <= 3 * 0.02, layer.name


def test_the_draws_after_the_full_rounds_follow_the_weights_within_the_budget() -> None:
    ones = torch.ones(8, dtype=torch.float64)  # every chunk drawn once since the first round
    heavy = torch.tensor([0.65, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05], dtype=torch.float64)
    drawn = _next_draws(heavy, ones, step=1, remaining=100, all_chunks=8)
    assert drawn == [0] * 5  # ceil(0.65 * 8) = 6 draws in all for chunk 0, the others at their one
    drawn = _next_draws(heavy, ones, step=3, remaining=100, all_chunks=8)  # 4 x 8 = 32 draws in all
    assert drawn.count(0) == 20 and all(drawn.count(c) == 1 for c in range(1, 8))
    # equal weights: the first step asks for nothing more, so the next one's draws are made (not none)
    assert sorted(_next_draws(ones / 8, ones, step=1, remaining=100, all_chunks=8)) == list(range(8))
    # the budget's last draws are shared in proportion, and never exceeded
    capped = _next_draws(heavy, ones, step=3, remaining=10, all_chunks=8)
    assert len(capped) == 10 and capped.count(0) >= 7
    assert _next_draws(heavy, ones, step=3, remaining=0, all_chunks=8) == []


def test_samples_that_weigh_alike_keep_whole_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    # drawing in proportion to equal weights gains nothing: every round draws every sample (one kept forward)
    torch.manual_seed(0)
    model = _plain(4)
    monkeypatch.setattr(measure, "_next_draws", lambda *a: pytest.fail("drew some samples only"))
    diagnosis = magicinit.diagnose(model, torch.randn(64, 3, 6, 6), seed=0, rate_precision=1e-3, rate_max_rounds=4)
    assert diagnosis.draws == 4 * 64
