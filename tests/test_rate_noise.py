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
from magicinit._core.rates.measure import ONE_ROUND_MIN_DRAWS


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
