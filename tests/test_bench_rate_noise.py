"""bench/rate_noise.py on a tiny model: its Gram matrices are J J^T from torch's own Jacobian, the per-draw
spread formula matches real Rademacher draws, and deflation by a subspace that holds everything leaves no noise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import rate_noise

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 7))


def test_gram_matrices_are_the_jacobian_products() -> None:
    model, sample = tiny_net(), torch.randn(6)
    weights = {"0": model[0].weight, "2": model[2].weight}
    grams = rate_noise.gram_matrices(model, sample, weights)
    for name, layer in (("0", model[0]), ("2", model[2])):

        def of_weight(weight: torch.Tensor, key: str = f"{name}.weight") -> torch.Tensor:
            return torch.func.functional_call(model, {key: weight}, (sample[None],)).flatten()

        jacobian = torch.autograd.functional.jacobian(of_weight, layer.weight.detach()).flatten(1).double()
        torch.testing.assert_close(grams[name], jacobian @ jacobian.T, rtol=1e-5, atol=1e-8)


def test_the_spread_formula_matches_real_draws() -> None:
    model, sample = tiny_net(), torch.randn(6)
    weight = model[0].weight
    gram = rate_noise.gram_matrices(model, sample, {"0": weight})["0"]
    formula = rate_noise.relative_std(gram, float(gram.trace()))
    drawn = rate_noise.drawn_std(model, sample, weight, draws=4000, seed=0)
    assert formula > 0.1  # not a trivial case
    assert drawn == pytest.approx(formula, rel=0.1)


def test_deflation() -> None:
    model = tiny_net()
    samples = [
        rate_noise.gram_matrices(model, torch.randn(6), {"0": model[0].weight, "4": model[4].weight}) for _ in range(2)
    ]
    everything = torch.eye(7, dtype=torch.float64)
    for gram in samples[0].values():
        trace = float(gram.trace())
        assert rate_noise.deflated_std(gram, everything, trace) == pytest.approx(0.0, abs=1e-12)
        none = torch.zeros(7, 0, dtype=torch.float64)
        assert rate_noise.deflated_std(gram, none, trace) == pytest.approx(rate_noise.relative_std(gram, trace))
    # the last layer's A is ||h||^2 times the identity: a Rademacher draw measures it exactly
    last = samples[0]["4"]
    assert rate_noise.relative_std(last, float(last.trace())) == pytest.approx(0.0, abs=1e-9)
    tables = rate_noise.layer_noise(samples)
    assert len(tables) == 2 and [row.name for row in tables[0]] == ["0", "4"]
    first = tables[0][0]  # 7 outputs: deflating 16 directions takes them all
    assert first.plain > 0.1 and first.deflated[16] == pytest.approx(0.0, abs=1e-9)


def test_a_larger_sample_holds_a_larger_share() -> None:
    model = nn.Sequential(nn.Linear(6, 16, bias=False), nn.ReLU(), nn.Linear(16, 7, bias=False))
    inputs = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    inputs[3] *= 10  # a bias-free ReLU net: its gradients are 10 times larger, its squared norms 100 times
    weights = {"0": model[0].weight, "2": model[2].weight}
    shares = rate_noise.sample_shares(model, inputs, weights, draws=4, seed=0)
    assert shares.shape == (2, 5)
    torch.testing.assert_close(shares.sum(1), torch.ones(2, dtype=torch.float64))
    assert (shares.argmax(1) == 3).all() and (shares[:, 3] > 0.8).all()
