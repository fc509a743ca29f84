"""Part 2's change rates at the cost of a few batched passes: the three ways of getting each
draw's gradient norms give the same estimate, the fast ones fall back where they cannot hold, and the
k-means sampler settles early without losing its clusters."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import magicinit
from conftest import affine_weights, noise_rates, plain_cnn, recording_later_rounds, rescale_keeping_function
from magicinit._core import samplers
from magicinit._core.rates import choose, from_activations, measure, norms, strategy

Result = TypeVar("Result")


class Mixed(nn.Module):
    """Every kind of site the way from site activations handles: convolutions (1-, 2- and 3-d, 'same'
    padding, dilation, stride, groups), a site output changed in place, a concatenation read by a conv
    (per-slice norms), a linear map on sequences and on vectors, a weight used at two sites, and a matrix
    product with a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding="same", dilation=2)
        self.left, self.right = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 6, 3, padding=1)
        self.grouped = nn.Conv2d(10, 8, 3, stride=2, groups=2)
        self.line = nn.Conv1d(8, 6, 3, padding=1)
        self.cube = nn.Conv3d(1, 2, 2)
        self.tied = nn.Linear(6, 6)
        self.product = nn.Parameter(torch.randn(6, 5) / 3)
        self.head = nn.Linear(5 + 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).relu_()  # changed in place: its gradient is still the stem output's
        h = torch.cat([torch.relu(self.left(h)), torch.relu(self.right(h))], 1)
        h = torch.relu(self.grouped(h))  # (n, 8, 3, 3)
        seq = torch.relu(self.line(h.flatten(2))).transpose(1, 2)  # (n, 9, 6): a sequence of 9 vectors
        seq = torch.relu(self.tied(torch.relu(self.tied(seq))))
        pooled = (seq @ self.product).mean(1)  # (n, 5)
        cube = self.cube(h[:, :2].unsqueeze(1)).flatten(2).mean(2)  # (n, 2)
        return self.head(torch.cat([pooled, cube], 1))


def _forced(monkeypatch: pytest.MonkeyPatch, way: str) -> None:
    """Make Part 2 take ``way``: "loop" (one chunk at a time) or "vectorized" (the strategy from site
    activations refused)."""
    if way == "loop":
        monkeypatch.setattr(choose, "_why_draws_cannot_be_batched", lambda context, units: "forced by the test")
    else:

        def refuse(self: from_activations.FromActivations) -> None:
            raise strategy.StrategyRefused("forced by the test")

        monkeypatch.setattr(from_activations.FromActivations, "_forward", refuse)


def _with_ways(call: Callable[[], Result]) -> tuple[Result, list[str]]:
    """``call()`` and the ways its rate measurements were computed (as ``choose_strategy`` described them)."""
    chosen: list[str] = []
    original = measure.choose_strategy

    def recording(*args: object) -> tuple[object, str]:
        chosen_strategy, description = original(*args)
        chosen.append(description)
        return chosen_strategy, description

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measure, "choose_strategy", recording)
        result = call()
    return result, chosen


def _diagnosis_with_way(model: nn.Module, x: torch.Tensor, **options: object) -> tuple[magicinit.Diagnosis, str]:
    """``magicinit.diagnose`` and the way its rates were computed."""
    diagnosis, ways = _with_ways(lambda: magicinit.diagnose(model, x, **options))
    return diagnosis, ways[-1]


@pytest.mark.slow
@pytest.mark.parametrize("way", ["loop", "vectorized"])
@pytest.mark.parametrize("net, shape, layers", [("Mixed", (12, 3, 6, 6), 9), ("Wide", (12, 8, 7, 7), 8)])
def test_norms_from_site_activations_equal_the_per_sample_gradients(
    monkeypatch, way: str, net: str, shape: tuple[int, ...], layers: int
) -> None:
    """Per layer, the rate and the mean and spread of its channels' rates (which a channel put in the wrong
    place would change: channels' weight norms differ after Part 1)."""
    torch.manual_seed(0)
    model, x = globals()[net](), torch.randn(shape)
    magicinit.init_(model, x, seed=0, between=False)
    fast, description = _diagnosis_with_way(model, x, seed=3, rate_precision=0.05)
    assert description == "from site activations"
    with monkeypatch.context() as patch:
        _forced(patch, way)
        reference, other = _diagnosis_with_way(model, x, seed=3, rate_precision=0.05)
    assert other.startswith("one sample at a time" if way == "loop" else "vectorized")
    assert fast.draws == reference.draws and len(fast.layers) == layers
    for ours, theirs in zip(fast.layers, reference.layers):  # the same noise: equal up to float32 rounding
        assert ours.rate > 0, ours.name
        for figure in ("rate", "rate_mean", "rate_cv"):
            assert getattr(ours, figure) == pytest.approx(getattr(theirs, figure), rel=1e-4), (ours.name, figure)


@pytest.mark.parametrize("way", ["loop", "vectorized"])
def test_every_way_gives_the_same_rates_when_some_samples_are_drawn_more_often(monkeypatch, way: str) -> None:
    """Two samples weigh most: after two rounds they get most of the draws, several in one round; every way
    of getting the norms draws the same noise for the same samples in the same order (slices included)."""
    torch.manual_seed(0)
    model, x = Mixed(), torch.randn(16, 3, 6, 6)
    x[:2] *= 8
    magicinit.init_(model, x, seed=0, between=False)
    options = {"seed": 3, "rate_precision": 0.02, "rate_max_rounds": 8}
    with recording_later_rounds() as later_rounds:
        fast, description = _diagnosis_with_way(model, x, **options)
    assert description == "from site activations"
    assert any(len(set(drawn)) < len(drawn) < 16 * 8 for drawn in later_rounds)  # samples drawn several times
    assert {0, 1} <= set(later_rounds[0])  # the two large ones among them
    with monkeypatch.context() as patch:
        _forced(patch, way)
        reference, other = _diagnosis_with_way(model, x, **options)
    assert other.startswith("one sample at a time" if way == "loop" else "vectorized")
    assert fast.draws == reference.draws
    for ours, theirs in zip(fast.layers, reference.layers):
        for figure in ("rate", "rate_mean", "rate_cv"):
            assert getattr(ours, figure) == pytest.approx(getattr(theirs, figure), rel=1e-4), (ours.name, figure)
        # the head's error is float32 rounding (its draws are exact), 1e-17 to 1e-9: absolute
        assert ours.rate_log_error == pytest.approx(theirs.rate_log_error, rel=1e-4, abs=1e-6), ours.name


class Wide(nn.Module):
    """Sites with few positions and many channels, whose norms come from the Gram matrix of each sample's
    positions: 2-d convolutions (stride, 1x1, 'same' padding with dilation, groups), one reading a
    concatenation (per-slice norms), a 1-d convolution and a linear map on a short sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(8, 32, 3, stride=2)  # 7x7 -> 3x3
        self.left, self.right = nn.Conv2d(32, 48, 1), nn.Conv2d(32, 48, 3, padding=1)
        self.joint = nn.Conv2d(96, 32, 3, padding=1)
        self.grouped = nn.Conv2d(32, 64, 3, padding="same", dilation=2, groups=2)
        self.line = nn.Conv1d(64, 32, 3, padding=1)
        self.sequence = nn.Linear(32, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.cat([torch.relu(self.left(h)), torch.relu(self.right(h))], 1)
        h = torch.relu(self.grouped(torch.relu(self.joint(h))))
        seq = torch.relu(self.line(h.flatten(2))).transpose(1, 2)  # (n, 9, 32)
        return self.head(torch.relu(self.sequence(seq)).mean(1))


def test_gram_norms_of_a_block_equal_those_of_the_formed_gradients() -> None:
    torch.manual_seed(10)
    rows_out, rows_in = torch.randn(5, 1, 7, 4), torch.randn(5, 1, 6 * 3, 4)  # 6 input channels, 3 taps each
    formed = torch.einsum("ngop,ngip->ngoi", rows_out, rows_in).double()
    channel, slices = norms.gram_norms(rows_out, rows_in, (2, 4))
    torch.testing.assert_close(channel, formed.square().sum(-1).flatten(1))
    by_slice = torch.stack([formed[..., :6].square().sum((1, 2, 3)), formed[..., 6:].square().sum((1, 2, 3))], -1)
    torch.testing.assert_close(slices, by_slice)


@pytest.mark.slow
@pytest.mark.parametrize("net, shape, gram_sites", [(Mixed, (16, 3, 6, 6), 0), (Wide, (12, 8, 7, 7), 7)])
def test_slices_of_a_concatenation_get_the_same_rescaling_either_way(
    monkeypatch, net: type[nn.Module], shape: tuple[int, ...], gram_sites: int
) -> None:
    """Rates and rescaling equal the loop's, with per-sample gradients formed (Mixed) or through the Gram
    matrix of each sample's positions (Wide: every site but the head's)."""
    through_gram = []
    original = norms.gram_norms

    def counting(rows_out: torch.Tensor, rows_in: torch.Tensor, sizes: object) -> object:
        through_gram.append((rows_out.shape[1:], rows_in.shape[1:]))
        return original(rows_out, rows_in, sizes)

    torch.manual_seed(1)
    _rescaled_both_ways(monkeypatch, net, torch.randn(shape), (from_activations, "gram_norms", counting))
    assert len(set(through_gram)) == gram_sites, through_gram


def _rescaled_both_ways(
    monkeypatch: pytest.MonkeyPatch, net: Callable[[], nn.Module], x: torch.Tensor, patched: tuple[object, str, object]
) -> magicinit.Report:
    """Rescale ``net()`` (its ``left`` weight times 4: one slice of a concatenation far from the other) from
    site activations, with ``patched`` (an object, an attribute, its replacement) in place, and a copy of it
    one sample at a time; check that rates, rescaling and weights agree (the same noise: up to float32
    rounding), and return the first's report."""
    fast = net()
    with torch.no_grad():
        fast.left.weight.mul_(4.0)
    slow = net()
    slow.load_state_dict(fast.state_dict())
    with monkeypatch.context() as patch:
        patch.setattr(*patched)
        report = rescale_keeping_function(fast, x, seed=5, rate_precision=0.05)
    assert any("from site activations" in note for note in report.notes)
    with monkeypatch.context() as patch:
        _forced(patch, "loop")
        looped = rescale_keeping_function(slow, x, seed=5, rate_precision=0.05)
    for ours, theirs in zip(report.layers, looped.layers):
        assert ours.rate_before == pytest.approx(theirs.rate_before, rel=1e-5), ours.name
        assert ours.weight_scale == pytest.approx(theirs.weight_scale, rel=1e-4), ours.name
    for name, tensor in fast.state_dict().items():
        torch.testing.assert_close(tensor, slow.state_dict()[name], rtol=1e-4, atol=1e-6)
    return report


class Squeeze(nn.Module):
    """1x1 convolutions on one position per sample, as in a squeeze-excitation block: the first reads a
    concatenation of two pooled branches (per-slice norms), the second its output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left, self.right = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 1)
        self.reduce, self.expand = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 12, 1)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        pooled = torch.cat([torch.relu(self.left(h)).mean((2, 3), keepdim=True), self.right(h).amax((2, 3), True)], 1)
        return self.head(torch.relu(self.expand(torch.relu(self.reduce(pooled)))).flatten(1))


def test_one_by_one_convolutions_on_one_position_get_the_same_rescaling_either_way(monkeypatch) -> None:
    """The squeeze-excitation convolutions' norms from one vector per sample (no gradient formed) equal the
    loop's per-sample gradients: rates, rescaling and weights."""
    one_vector: list[str] = []
    original = from_activations.FromActivations._one_vector_norms

    def counting(self: object, name: str, *args: object) -> None:
        one_vector.append(name)
        original(self, name, *args)  # type: ignore[arg-type]

    torch.manual_seed(1)
    patched = (from_activations.FromActivations, "_one_vector_norms", counting)
    report = _rescaled_both_ways(monkeypatch, Squeeze, torch.randn(12, 3, 5, 5), patched)
    assert {"reduce", "expand"} <= set(one_vector)
    assert any(layer.weight_scale not in (None, 1.0) for layer in report.layers)


def test_the_estimate_agrees_with_rates_measured_here() -> None:
    torch.manual_seed(2)
    model, x = plain_cnn(6, width=8), torch.randn(32, 3, 8, 8)
    diagnosis, description = _diagnosis_with_way(model, x, seed=0, rate_precision=0.02)
    assert description == "from site activations"
    own = noise_rates(model, x, affine_weights(model), rounds=8, seed=4)
    for layer in diagnosis.layers:
        assert layer.rate == pytest.approx(own[layer.name], rel=0.15), layer.name


class InteractingSamples(nn.Module):
    """Samples that interact (each is compared with the batch mean) and a shape that depends on the data
    (torch.func cannot vectorize ``nonzero``): only one draw at a time gives each sample's own gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = h - h.mean(0, keepdim=True) + 0 * h.nonzero().shape[0]
        return self.b(h)


def test_samples_that_interact_fall_back_to_one_draw_at_a_time(monkeypatch) -> None:
    torch.manual_seed(3)
    model, x = InteractingSamples(), torch.randn(16, 6)
    diagnosis, description = _diagnosis_with_way(model, x, seed=1, rate_precision=0.05)
    assert description.startswith(
        "one sample at a time (not from site activations: its norms of the first "
        "and last samples disagreed with those of each sample alone"
    )
    assert "could not be vectorized" in description
    with monkeypatch.context() as patch:
        _forced(patch, "loop")
        looped = magicinit.diagnose(model, x, seed=1, rate_precision=0.05)
    for ours, theirs in zip(diagnosis.layers, looped.layers):  # the fallback starts from the same noise
        assert ours.rate == pytest.approx(theirs.rate, rel=1e-6), ours.name


def test_a_weight_used_through_a_view_is_measured_by_vectorized_gradients() -> None:
    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)  # b's weight read transposed

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.a(x)) @ self.b.weight.t()

    _, description = _diagnosis_with_way(Transposed(), torch.randn(8, 6), seed=0, rate_precision=0.1)
    assert description == (
        "vectorized per-sample gradients (not from site activations: 'b' is used by t, not only "
        "as the weight of affine maps)"
    )


class HarmlessUses(nn.Module):
    """Calls on a weight that carry no gradient of their own: the weight itself back, and metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            dtype, _ = self.b.weight.dtype, self.b.weight.shape
        h = torch.relu(F.linear(torch.relu(self.a(x)), self.b.weight.contiguous().to(dtype), self.b.bias))
        return self.c(h)


def test_calls_that_give_the_weight_back_or_metadata_keep_the_fast_way() -> None:
    torch.manual_seed(12)
    _, description = _diagnosis_with_way(HarmlessUses(), torch.randn(16, 6), seed=0, rate_precision=0.1)
    assert description == "from site activations"


class _LinearFunction(torch.autograd.Function):
    """A linear map with its own backward: its forward runs under no_grad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        return grad @ weight, grad.t() @ x


class ThroughAFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(_LinearFunction.apply(torch.relu(self.a(x)), self.b.weight) + self.b.bias))


def test_a_weight_inside_a_custom_function_is_measured_another_way(monkeypatch) -> None:
    # the graph sees F.linear inside the Function's forward (under no_grad), and the gradient comes from
    # the Function's own backward: the site norms would miss it
    model, reason = (
        ThroughAFunction,
        (
            "'b' is used by linear where autograd does not record it (no_grad, or a "
            "custom Function), not only as the weight of affine maps"
        ),
    )
    torch.manual_seed(8)
    net, x = model(), torch.randn(12, 6)
    diagnosis, description = _diagnosis_with_way(net, x, seed=1, rate_precision=0.1)
    assert description.startswith(
        f"vectorized per-sample gradients (not from site activations: {reason})"
    ) or description.startswith(f"one sample at a time (not from site activations: {reason}"), description
    with monkeypatch.context() as patch:
        _forced(patch, "loop")
        looped = magicinit.diagnose(net, x, seed=1, rate_precision=0.1)
    for ours, theirs in zip(diagnosis.layers, looped.layers):  # the same noise, the whole gradient
        assert ours.rate == pytest.approx(theirs.rate, rel=1e-4), ours.name


def test_part2_makes_few_model_calls() -> None:
    torch.manual_seed(4)
    model, x = plain_cnn(6, width=8), torch.randn(64, 3, 8, 8)
    calls = {"count": 0}
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__("count", calls["count"] + 1))
    report = magicinit.init_(model, x, seed=0)
    # Part 1: a 2-sample probe, one pass and one to re-measure; Part 2: the graph trace, a 1-sample shape probe,
    # one draw alone for the check, one batched forward for the first two rounds, one for each later round (of
    # the samples it draws), and the function checks (the first samples and all samples, before and after; no
    # call per draw)
    (draws, rounds), *_ = [
        (int(a), int(b)) for note in report.notes for a, b in re.findall(r"from (\d+) noise draws in (\d+) round", note)
    ]
    assert calls["count"] <= 14 + max(rounds - 2, 0), (calls["count"], rounds)
    assert draws >= 2 * 64 > calls["count"]
    assert report.rate_spread_after < 1.01 and report.rate_spread_before > 3


def test_kmeans_settles_before_its_iteration_cap_with_tight_clusters(monkeypatch) -> None:
    torch.manual_seed(5)
    centres = F.normalize(torch.randn(4, 6), dim=1)
    points = centres[torch.randint(4, (400,))] + 0.05 * torch.randn(400, 6)  # 4 tight clusters
    iterations = []
    original_argmax = torch.Tensor.argmax

    def counting(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.dim() == 3 and self.shape[-1] == 4:
            iterations.append(1)
        return original_argmax(self, *args, **kwargs)

    request = samplers.SamplerRequest(
        name="layer",
        module=nn.Linear(6, 4),
        shape=torch.Size((1, 4, 6)),
        current=torch.zeros(1, 4, 6),
        layer_input=(points,),
        generator=torch.Generator().manual_seed(0),
        input_patches=lambda layer_input: layer_input.reshape(1, -1, 6),
    )
    monkeypatch.setattr(torch.Tensor, "argmax", counting)
    filters = samplers.SAMPLERS["kmeans-full"](request)
    monkeypatch.undo()
    assert 1 < len(iterations) < samplers.KMEANS_ITERATIONS
    # every cluster found: each filter responds most to its own cluster's points
    responses = (points @ filters[0].T).argmax(1)
    assert len(set(responses.tolist())) == 4


def test_a_forward_under_autocast_is_measured_from_site_activations(monkeypatch) -> None:
    def autocast_forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(batch).float()

    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    x = torch.randn(12, 3, 5, 5)
    fast, description = _diagnosis_with_way(model, x, seed=2, rate_precision=0.1, forward=autocast_forward)
    assert description == "from site activations"
    with monkeypatch.context() as patch:
        _forced(patch, "loop")
        looped = magicinit.diagnose(model, x, seed=2, rate_precision=0.1, forward=autocast_forward)
    for ours, theirs in zip(fast.layers, looped.layers):  # bfloat16 products: equal to about 1e-4
        assert ours.rate == pytest.approx(theirs.rate, rel=1e-3), ours.name


class ReadsThePreviousSample(nn.Module):
    """Each sample also reads the one before it: invisible in the first sample, visible in the last."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = h + 3 * torch.cat([torch.zeros_like(h[:1]), h[:-1].detach()])
        return self.b(h)


def test_an_interaction_the_first_sample_does_not_show_is_caught_at_the_last() -> None:
    torch.manual_seed(7)
    _, description = _diagnosis_with_way(ReadsThePreviousSample(), torch.randn(16, 6), seed=1, rate_precision=0.1)
    assert not description.startswith("from site activations"), description


@pytest.mark.parametrize("magnitude", [1e-30, 1e-20, 1.0, 1e20, 1e30])
def test_squared_norms_neither_underflow_nor_overflow(magnitude: float) -> None:
    torch.manual_seed(11)
    values = torch.randn(3, 4, 5, 6)
    expected = values.double().square().sum((1, 3)) * magnitude**2
    got = norms.squared_norms(values * magnitude, (1, 3))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0.0)


def test_the_agreement_check_ignores_only_totals_at_float32_rounding_level() -> None:
    """cait's class-attention keys (behind a 1e-5 layer scale) have squared gradient norms 1e-14 of the
    largest, made of rounding: batch and alone differ by 30-70 % there, which says nothing of samples
    interacting. Such totals are not compared; a small total above the rounding level still is."""

    def draw_norms(**totals: float) -> norms.DrawNorms:
        return norms.DrawNorms(1, {name: torch.tensor([[total / 2, total / 2]]) for name, total in totals.items()}, {})

    batched = draw_norms(large=1.4e7, rounding=2.0e-7, small=1.0)
    assert choose._agree(draw_norms(large=1.41e7, rounding=3.0e-7, small=1.0), batched)
    assert not choose._agree(draw_norms(large=1.4e7, rounding=2.0e-7, small=1.5), batched)  # 1e-7 of the largest
    assert not choose._agree(draw_norms(large=1.6e7, rounding=2.0e-7, small=1.0), batched)
    assert 2.0e-7 < choose.ROUNDING_LEVEL * 1.4e7 < 1.0  # "small" is above the level, "rounding" below


class TiedLanguageModel(nn.Module):
    """A language model whose output layer is its input embedding's table (as T5's and GPT-2's are), with a
    padding row, a token repeated within a sample, and a second lookup of the table by ``torch.embedding``.
    Part 2 can rescale its two hidden layers against each other; the tied table stays fixed, and its rate is
    measured with theirs."""

    def __init__(self, vocabulary: int = 17, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width, padding_idx=0)
        self.first, self.second = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocabulary, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + 0.5 * torch.embedding(self.embed.weight, tokens.flip(1))
        return self.head(torch.relu(self.second(torch.relu(self.first(h)))))


def _tokens(count: int, length: int = 6, vocabulary: int = 17) -> torch.Tensor:
    tokens = torch.randint(1, vocabulary, (count, length), generator=torch.Generator().manual_seed(4))
    tokens[:, -2:] = 0  # padding: its row gets no gradient from these positions
    tokens[:, 1] = tokens[:, 0]  # a token read twice in one sample: its row gets both gradients
    return tokens


def _rates_with_way(model: nn.Module, tokens: torch.Tensor) -> tuple[dict[str, float], str]:
    """The rates ``init_`` measured before Part 2 (of the tied table too, which it holds fixed) on a copy of
    ``model``, and the way they were computed."""
    report, ways = _with_ways(
        lambda: magicinit.init_(copy.deepcopy(model), tokens, seed=3, within=False, rate_precision=0.05)
    )
    return {layer.name: layer.rate_before for layer in report.layers if layer.rate_before is not None}, ways[0]


def test_a_table_tied_to_an_embedding_lookup_is_measured_from_site_activations(monkeypatch) -> None:
    """The tied table's norms from site activations (the lookups' per-sample gradients added to the linear
    map's) equal those of one sample at a time, which takes plain autograd gradients of the parameters."""
    torch.manual_seed(0)
    model, tokens = TiedLanguageModel(), _tokens(10)
    magicinit.init_(model, tokens, seed=0, between=False)
    fast, description = _rates_with_way(model, tokens)
    assert description == "from site activations"
    with monkeypatch.context() as patch:
        _forced(patch, "loop")
        reference, other = _rates_with_way(model, tokens)
    assert other.startswith("one sample at a time")
    assert set(fast) == {"first", "second", "head"}
    for name, rate in fast.items():  # the same noise: equal up to float32 rounding
        assert rate > 0 and rate == pytest.approx(reference[name], rel=1e-4), name


@pytest.mark.parametrize("option", ["max_norm", "scale_grad_by_freq"])
def test_an_embedding_lookup_that_renormalizes_or_weighs_by_frequency_is_measured_another_way(option: str) -> None:
    model, tokens = TiedLanguageModel(), _tokens(6)
    setattr(model.embed, option, 1.0 if option == "max_norm" else True)
    magicinit.init_(model, tokens, seed=0, between=False)
    rates, description = _rates_with_way(model, tokens)
    assert "head" in rates and f"an embedding lookup with {option}" in description
