"""Every weight wherever it is used: attention, GPT-2 Conv1D, functional calls, tied, shared and reparametrized weights.

The channel statistics are re-measured by a capture written here: ``torch.nn.functional.linear``
and ``torch.addmm`` are wrapped for one forward pass (torch's attention and ``nn.Linear`` look
them up at call time), which records every output with the identity of the weight it came from.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import magicinit
from conftest import assert_same_state, assert_untouched, relative_change, state_copy
from magicinit import LayerStatus

TOLERANCE = 1e-3


@contextmanager
def affine_outputs() -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every ``(weight, output)`` of ``F.linear`` and ``torch.addmm`` calls made in the block."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    linear, addmm = F.linear, torch.addmm

    def recording_linear(x, weight, bias=None):  # type: ignore[no-untyped-def]
        out = linear(x, weight, bias)
        calls.append((weight, out.detach().clone()))
        return out

    def recording_addmm(bias, x, weight, **kwargs):  # type: ignore[no-untyped-def]
        out = addmm(bias, x, weight, **kwargs)
        calls.append((weight, out.detach().clone()))
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "linear", recording_linear)
        patch.setattr(torch, "addmm", recording_addmm)
        yield calls


def _root(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._base if tensor._base is not None else tensor


def site_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(weight, output)`` of every linear/addmm call of one eval forward, with grad enabled so that
    torch's attention takes its Python path (its fast path skips these functions)."""
    model.eval()
    with affine_outputs() as calls:
        model(x)
    return calls


def assert_channels_normalized(output: torch.Tensor, what: str, beta: float = 0.0) -> None:
    """Channels last: every output channel has mean ``beta`` and population std 1 over all other dimensions."""
    flat = output.double().reshape(-1, output.shape[-1])
    var, mean = torch.var_mean(flat, dim=0, correction=0)
    assert (mean - beta).abs().max() < TOLERANCE, (what, float((mean - beta).abs().max()))
    assert (var.sqrt() - 1).abs().max() < TOLERANCE, (what, float((var.sqrt() - 1).abs().max()))


def channel_stds(output: torch.Tensor) -> torch.Tensor:
    return output.double().reshape(-1, output.shape[-1]).std(dim=0, correction=0)


# --- attention ------------------------------------------------------------------------------------


class TransformerNet(nn.Module):
    """Token features -> 2 transformer encoder layers (attention + MLP) -> head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def test_transformer_encoder_every_site_normalized_attention_included() -> None:
    torch.manual_seed(0)
    model, x = TransformerNet().eval(), torch.randn(48, 7, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = magicinit.init_(model, x, seed=0, between=False)
        with torch.no_grad():
            before = model(x)
        rescaled = magicinit.rescale_(model, x, seed=0, rate_precision=0.1)  # attention pins: function kept
        with torch.no_grad():
            assert relative_change(model(x), before) < 1e-4
        assert all(entry.rate_before is not None for entry in rescaled.layers)
        magicinit.init_(model, x, seed=0, between=False)
    names = [entry.name for entry in report.layers]
    for i in range(2):
        assert f"encoder.layers.{i}.self_attn.in_proj_weight" in names
        assert f"encoder.layers.{i}.self_attn.out_proj" in names
    assert all(entry.status == LayerStatus.INITIALIZED for entry in report.layers), [
        (e.name, e.status, e.notes) for e in report.layers
    ]
    calls = site_outputs(model, x)
    attention = [p for n, p in model.named_parameters() if n.endswith("in_proj_weight")]
    assert sum(_root(w) is attention[0] for w, _ in calls) == 1  # the packed projection: one site
    assert len(calls) == 2 + 4 * 2  # embed, head, and 4 sites per layer (in_proj, out_proj, linear1, linear2)
    for weight, output in calls:
        if any(_root(weight) is a for a in attention):
            assert output.shape[-1] == 3 * 16  # one channel per row of in_proj_weight: q, k and v
        assert_channels_normalized(output, tuple(weight.shape))


def test_attention_in_a_model_that_would_take_the_fast_path() -> None:
    """A bare MultiheadAttention in eval mode, no grad anywhere: the sites are still found."""
    torch.manual_seed(1)
    attention = nn.MultiheadAttention(12, 3, batch_first=True).eval().requires_grad_(True)
    model = nn.Sequential()
    model.attention = attention

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = attention

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attention(x, x, x, need_weights=False)[0]

    model, x = Wrapper(), torch.randn(32, 5, 12)
    report = magicinit.init_(model, x, seed=0, between=False)
    assert [e.name for e in report.layers] == ["attention.in_proj_weight", "attention.out_proj"]
    for weight, output in site_outputs(model, x):
        assert_channels_normalized(output, tuple(weight.shape))


def test_cross_attention_with_separate_projections() -> None:
    torch.manual_seed(2)
    attention = nn.MultiheadAttention(12, 2, kdim=6, vdim=6, batch_first=True)

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = attention

        def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            queries, memory = batch
            return self.attention(queries, memory, memory)[0]

    model = Cross()
    batch = (torch.randn(32, 5, 12), torch.randn(32, 4, 6))
    report = magicinit.init_(model, batch, forward=lambda m, b: m(b), seed=0, between=False)
    expected = {f"attention.{p}_proj_weight" for p in "qkv"} | {"attention.out_proj"}
    assert {e.name for e in report.layers} == expected
    model.eval()
    with affine_outputs() as calls:
        model(batch)
    assert len(calls) == 4
    for weight, output in calls:
        assert_channels_normalized(output, tuple(weight.shape))


# --- GPT-2 Conv1D, functional calls ------------------------------------------------------------------


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored ``(in, out)``, applied with ``torch.addmm``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPT2MLP(nn.Module):
    def __init__(self, width: int = 16, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(4 * width, width), Conv1D(width, 4 * width)
        self.act = activation or nn.GELU(approximate="tanh")
        self.head = Conv1D(3, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c_proj(self.act(self.c_fc(x))))


def test_gpt2_conv1d_mlp_every_site_normalized() -> None:
    torch.manual_seed(3)
    model, x = GPT2MLP(), torch.randn(40, 6, 16)
    report = magicinit.init_(model, x, seed=0, between=False)
    assert [(e.name, e.type, e.shape, e.status) for e in report.layers] == [
        ("c_fc", "Conv1D", (16, 64), "initialized"),
        ("c_proj", "Conv1D", (64, 16), "initialized"),
        ("head", "Conv1D", (16, 3), "initialized"),
    ]
    calls = site_outputs(model, x)
    assert len(calls) == 3
    for weight, output in calls:
        assert_channels_normalized(output, tuple(weight.shape))


def test_gpt2_conv1d_with_relu_is_rescaled_keeping_its_function() -> None:
    torch.manual_seed(4)
    model, x = GPT2MLP(activation=nn.ReLU()), torch.randn(40, 6, 16)
    magicinit.init_(model, x, seed=0, between=False)
    with torch.no_grad():
        model.c_proj.weight.mul_(9.0)  # an uneven scale to equalize
        before = model(x)
    report = magicinit.rescale_(model, x, seed=1)
    with torch.no_grad():
        assert relative_change(model(x), before) < 1e-4
    assert report.rate_spread_after < report.rate_spread_before / 10
    assert report["c_proj"].weight_scale != 1.0


class Functional(nn.Module):
    """A forward that calls ``F.linear`` on a module's parameters and multiplies by a bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.mix = nn.Parameter(torch.randn(16, 12) * 0.1)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(F.linear(x, self.proj.weight, self.proj.bias))
        return self.head(torch.relu(hidden @ self.mix))


def test_functional_linear_and_a_bare_matmul_parameter_are_sites() -> None:
    torch.manual_seed(5)
    model, x = Functional(), torch.randn(64, 8)
    report = magicinit.init_(model, x, seed=0, between=False)
    assert [(e.name, e.status) for e in report.layers] == [  # the model's own parameters before its modules'
        ("mix", "initialized"),
        ("proj", "initialized"),
        ("head", "initialized"),
    ]
    assert "no bias: channel means are not set to beta (std is)" in report["mix"].notes
    with torch.no_grad():
        hidden = torch.relu(F.linear(x, model.proj.weight, model.proj.bias))
        mixed = hidden @ model.mix
        out = model.head(torch.relu(mixed))
    assert_channels_normalized(F.linear(x, model.proj.weight, model.proj.bias), "proj")
    stds = channel_stds(mixed)  # no bias: std 1, the mean is what it is
    assert (stds - 1).abs().max() < TOLERANCE
    assert_channels_normalized(out, "head")


# --- tied and shared weights ---------------------------------------------------------------------------


class TiedLanguageModel(nn.Module):
    def __init__(self, vocabulary: int = 30, width: int = 16) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocabulary, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.tokens(ids))))


def test_weight_tied_to_an_embedding_is_left_as_is_and_said_so() -> None:
    torch.manual_seed(6)
    model, ids = TiedLanguageModel(), torch.randint(0, 30, (64, 9))
    table = model.tokens.weight.detach().clone()
    report = magicinit.init_(model, ids, seed=0, between=False)
    assert torch.equal(model.tokens.weight, table)  # the embedding the layers after it were fitted to
    assert report["head"].status == LayerStatus.EXCLUDED
    assert "tied: also read outside affine calls (by embedding in 'tokens')" in report["head"].notes[0]
    assert report["mix"].status == LayerStatus.INITIALIZED
    calls = site_outputs(model, ids)
    mix_output = next(out for weight, out in calls if weight is model.mix.weight)
    assert_channels_normalized(mix_output, "mix, on the real embedding's output")


class SharedWeight(nn.Module):
    """Two Linear modules holding one Parameter (their biases are their own)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_parameter_shared_by_two_modules_one_entry_first_site_normalized_others_reported() -> None:
    torch.manual_seed(7)
    model, x = SharedWeight(), torch.randn(64, 12)
    report = magicinit.init_(model, x, seed=0, between=False)
    assert [e.name for e in report.layers] == ["a", "head"]
    entry = report["a"]
    assert entry.status == LayerStatus.INITIALIZED and entry.calls == 2
    assert "the same parameter is also registered as b.weight" in entry.notes
    assert any("2 affine sites" in note and "not normalized" in note for note in entry.notes), entry.notes
    assert all(e.status != LayerStatus.NEVER_CALLED for e in report.layers)
    calls = site_outputs(model, x)
    first, second, head = calls
    assert first[0] is second[0] is model.a.weight
    assert_channels_normalized(first[1], "a (the first site)")
    assert_channels_normalized(head[1], "head")


# --- reparametrized weights ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_weight_norm_and_prune_are_initialized_through_their_real_parameters() -> None:
    torch.manual_seed(8)
    normed = torch.nn.utils.weight_norm(nn.Linear(8, 16))
    pruned = prune.random_unstructured(nn.Linear(16, 16), "weight", amount=0.5)
    model, x = nn.Sequential(normed, nn.ReLU(), pruned, nn.ReLU(), nn.Linear(16, 3)), torch.randn(64, 8)
    g, v, orig = normed.weight_g.detach().clone(), normed.weight_v.detach().clone(), pruned.weight_orig.detach().clone()
    report = magicinit.init_(model, x, seed=0, between=False)
    assert not torch.equal(normed.weight_g, g) and not torch.equal(normed.weight_v, v)
    assert not torch.equal(pruned.weight_orig, orig)
    assert [(e.name, e.status) for e in report.layers] == [
        ("0", "initialized"),
        ("2", "initialized"),
        ("4", "initialized"),
    ]
    calls = site_outputs(model, x)  # the weights the hooks recompute from the real parameters
    assert len(calls) == 3
    for weight, output in calls:
        assert_channels_normalized(output, tuple(weight.shape))
    assert bool((pruned.weight[pruned.weight_mask == 0] == 0).all())  # pruned entries stay pruned


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_weight_norm_model_is_rescaled_through_its_magnitude() -> None:
    torch.manual_seed(9)
    normed = torch.nn.utils.weight_norm(nn.Linear(8, 16))
    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), normed, nn.ReLU(), nn.Linear(16, 3)), torch.randn(64, 8)
    with torch.no_grad():
        normed.weight_g.mul_(20.0)
        before = model(x)
    g, v = normed.weight_g.detach().clone(), normed.weight_v.detach().clone()
    report = magicinit.rescale_(model, x, seed=0)
    with torch.no_grad():
        assert relative_change(model(x), before) < 1e-4
    factor = report["2"].weight_scale
    assert abs(factor - 1.0) > 0.1 and torch.equal(normed.weight_v, v)
    assert torch.allclose(normed.weight_g, g * factor, rtol=1e-6)  # the magnitude carries the rescaling
    rates = [d.rate for d in magicinit.diagnose(model, x, seed=5, rate_precision=0.05).layers]
    assert max(rates) / min(rates) < 1.3


@pytest.mark.parametrize(
    "wrap,named",
    [
        (lambda layer: torch.nn.utils.parametrizations.weight_norm(layer), "_WeightNorm"),
        (lambda layer: torch.nn.utils.parametrizations.orthogonal(layer), "_Orthogonal"),
        (lambda layer: torch.nn.utils.spectral_norm(layer), "spectral_norm"),
    ],
)
def test_other_reparametrizations_are_left_as_is_and_named(wrap, named: str) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(10)
    wrapped = wrap(nn.Linear(12, 12))
    model, x = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), wrapped, nn.ReLU(), nn.Linear(12, 3)), torch.randn(64, 6)
    saved = {name: p.detach().clone() for name, p in wrapped.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        magicinit.rescale_(model, x, seed=0, rate_precision=0.1)  # the left-alone layer is fixed in Part 2
        report = magicinit.init_(model, x, seed=0, between=False)
    assert report["2"].status == LayerStatus.EXCLUDED and named in report["2"].notes[0]
    assert all(torch.equal(p, saved[name]) for name, p in wrapped.named_parameters())
    assert report["0"].status == report["4"].status == LayerStatus.INITIALIZED
    calls = site_outputs(model, x)
    assert_channels_normalized(calls[0][1], "0")
    assert_channels_normalized(calls[-1][1], "4")


class EinsumLinear(nn.Linear):
    """A linear layer whose forward applies its weight with ``einsum`` (not an affine call magicinit knows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,oi->bo", x, self.weight) + self.bias


def test_a_layer_that_runs_but_applies_its_weight_otherwise_is_excluded_not_never_called() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), EinsumLinear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    weight = model[2].weight.detach().clone()
    report = magicinit.init_(model, torch.randn(32, 4), seed=0, between=False)
    assert report["2"].status == LayerStatus.EXCLUDED
    assert "read by einsum in '2', not by an affine call" in report["2"].notes[0]
    assert torch.equal(model[2].weight, weight)


# --- found by a red-team sweep ---------------------------------------------------------------------------


class BufferBias(nn.Module):
    """A site whose bias is a buffer (no parameter): kept as it is, and what follows sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.register_buffer("shift", torch.full((8,), 3.0))
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.linear(x, self.weight, self.shift))


def test_a_bias_that_is_no_parameter_is_kept_and_the_next_layer_sees_it() -> None:
    torch.manual_seed(11)
    model, x = BufferBias(), torch.randn(48, 8)
    report = magicinit.init_(model, x, seed=0, between=False)
    first, second = site_outputs(model, x)
    assert torch.allclose(channel_stds(first[1]), torch.ones(8, dtype=torch.float64), atol=TOLERANCE)
    measured_mean = first[1].double().mean(0)
    assert torch.allclose(torch.tensor(report[""].channel_mean_after, dtype=torch.float64), measured_mean, atol=1e-4)
    assert "its bias is no parameter" in report[""].notes[0] and torch.equal(model.shift, torch.full((8,), 3.0))
    assert_channels_normalized(second[1], "out")


def test_skip_and_frozen_reach_parameters_and_biases() -> None:
    torch.manual_seed(12)
    model, x = (
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
        torch.randn(48, 8),
    )
    model[4].bias.requires_grad_(False)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = magicinit.init_(model, x, seed=0, skip=["0.weight", "2.bias"], between=False)
    assert report["0"].status == LayerStatus.EXCLUDED and "skipped" in report["0"].notes[0]
    assert torch.equal(model[0].weight, saved["0.weight"]) and torch.equal(model[2].bias, saved["2.bias"])
    assert torch.equal(model[4].bias, saved["4.bias"])  # frozen
    for name in ("2", "4"):
        assert report[name].status == LayerStatus.INITIALIZED and "channel means are not set" in report[name].notes[0]
    calls = site_outputs(model, x)
    for _, output in calls[1:]:
        assert (channel_stds(output) - 1).abs().max() < TOLERANCE


def test_packed_cross_attention_every_row_of_in_proj_weight_normalized() -> None:
    torch.manual_seed(13)
    decoder = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True)

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = decoder

        def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return self.decoder(*batch)

    model, batch = Decoder(), (torch.randn(32, 5, 16), torch.randn(32, 7, 16))
    before = model.decoder.multihead_attn.in_proj_weight.detach().clone()
    report = magicinit.init_(model, batch, forward=lambda m, b: m(b), seed=0, between=False)
    entry = report["decoder.multihead_attn.in_proj_weight"]
    assert entry.status == LayerStatus.INITIALIZED and len(entry.channel_std_after) == 48
    assert any("each on its own part of the weight: all normalized" in note for note in entry.notes)
    assert not torch.equal(model.decoder.multihead_attn.in_proj_weight[16:], before[16:])
    model.eval()
    with affine_outputs() as calls:
        model(batch)
    cross = [out for weight, out in calls if _root(weight) is model.decoder.multihead_attn.in_proj_weight]
    assert [out.shape[-1] for out in cross] == [16, 32]  # q rows, then k and v rows
    for output in cross:
        assert_channels_normalized(output, "cross-attention projection")


class CastsItsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(F.linear(x, self.fc.weight.to(x.dtype).contiguous(), self.fc.bias)))


def test_a_weight_passed_through_a_no_op_cast_is_a_site() -> None:
    report = magicinit.init_(CastsItsWeight(), torch.randn(32, 8), seed=0, between=False)
    assert [(e.name, e.status) for e in report.layers] == [("fc", "initialized"), ("out", "initialized")]


class AppliedOtherwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(6, 5))
        self.E = nn.Parameter(torch.randn(6, 6))
        self.pair = nn.Bilinear(6, 6, 6)
        self.rnn = nn.GRU(6, 6, batch_first=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (self.A @ x).transpose(1, 2)  # the parameter as the first operand
        h = torch.einsum("bti,oi->bto", h, self.E)
        return self.fc(self.rnn(self.pair(h, h))[0][:, -1])


def test_weights_applied_by_other_operations_are_listed_as_left_alone() -> None:
    model = AppliedOtherwise()
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = magicinit.init_(model, torch.randn(32, 5, 4), seed=0, between=False)
    statuses = {e.name: (e.status, e.notes[0] if e.notes else "") for e in report.layers}
    assert statuses["fc"][0] == LayerStatus.INITIALIZED
    for name, operation in [("A", "matmul"), ("E", "einsum"), ("pair", "bilinear"), ("rnn.weight_ih_l0", "gru")]:
        status, note = statuses[name]
        assert status == LayerStatus.EXCLUDED and f"read by {operation}" in note, (name, note)
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters() if not n.startswith("fc."))


def test_a_vector_weight_and_a_compiled_model() -> None:
    class VectorHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.v = nn.Linear(8, 8), nn.Parameter(torch.randn(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(F.relu(self.fc(x)), self.v)

    x = torch.randn(32, 8)
    assert magicinit.init_(VectorHead(), x, seed=0)["fc"].status == LayerStatus.INITIALIZED
    original = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    compiled = torch.compile(original, backend="eager")
    report = magicinit.init_(compiled, x, seed=0, between=False)  # the module it wraps is initialized
    assert [e.name for e in report.layers] == ["0", "2"]
    assert_channels_normalized(original[0](x).detach(), "0")


def test_a_rescaling_that_can_change_nothing_measures_nothing_and_says_so() -> None:
    attention = nn.MultiheadAttention(12, 3, batch_first=True)

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = attention

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attention(x, x, x)[0]

    model = SelfAttention()
    saved = state_copy(model)
    report = magicinit.rescale_(model, torch.randn(16, 5, 12), seed=0, rate_precision=0.1)
    assert all(e.status == LayerStatus.FIXED and e.rate_before is None for e in report.layers)
    assert_untouched(model, saved)
    assert any("changed nothing" in note and "diagnose" in note for note in report.notes)


# --- found by a code review ------------------------------------------------------------------------------


def test_an_expanded_weight_is_refused_by_name_and_the_model_left_as_it_was() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel, self.out = nn.Parameter(torch.randn(1, 1, 3, 3)), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(F.conv2d(x, self.kernel.expand(4, 1, 3, 3), groups=4).mean((2, 3)))

    model = Shared()
    saved = state_copy(model)
    with pytest.raises(
        magicinit.MagicInitError, match=r"weight 'kernel' is applied through an expanded view.*skip=\['kernel'\]"
    ):
        magicinit.init_(model, torch.randn(16, 4, 6, 6), seed=0)
    assert_untouched(model, saved)
    report = magicinit.init_(model, torch.randn(16, 4, 6, 6), seed=0, skip=["kernel"], between=False)
    assert report["kernel"].status == LayerStatus.EXCLUDED


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_a_reparametrized_weight_called_twice_has_the_rate_of_the_same_plain_weight() -> None:
    torch.manual_seed(14)

    class Twice(nn.Module):
        def __init__(self, middle: nn.Module) -> None:
            super().__init__()
            self.inp, self.middle, self.out = nn.Linear(6, 8), middle, nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.middle(torch.relu(self.middle(torch.relu(self.inp(x)))))))

    plain = Twice(nn.Linear(8, 8))
    normed = Twice(torch.nn.utils.weight_norm(nn.Linear(8, 8)))
    with torch.no_grad():
        for name in ("inp.weight", "inp.bias", "out.weight", "out.bias", "middle.bias"):
            normed.get_parameter(name).copy_(plain.get_parameter(name))
        normed.middle.weight_v.copy_(plain.middle.weight)
        normed.middle.weight_g.copy_(plain.middle.weight.norm(dim=1, keepdim=True))
    x = torch.randn(64, 6)
    rate = {
        name: magicinit.diagnose(net, x, seed=3, rate_precision=0.05)["middle"].rate
        for name, net in (("plain", plain), ("normed", normed))
    }
    assert rate["normed"] == pytest.approx(rate["plain"], rel=1e-4)
    magicinit.init_(normed, x, seed=0, rate_precision=0.1)
    copied = __import__("copy").deepcopy(normed)  # no graph left in the hook's attribute
    with torch.no_grad():
        expected = normed.middle.weight_g * normed.middle.weight_v / normed.middle.weight_v.norm(dim=1, keepdim=True)
    assert torch.allclose(copied.middle.weight, expected)


def test_skip_protects_a_shared_bias_and_accepts_alias_names() -> None:
    torch.manual_seed(15)
    model = SharedWeight()
    model.b.bias = model.a.bias
    bias = model.a.bias.detach().clone()
    magicinit.init_(model, torch.randn(32, 12), seed=0, skip=["b"], between=False)
    assert torch.equal(model.a.bias, bias)  # it is b's bias too, and b is skipped
    report = magicinit.init_(SharedWeight(), torch.randn(32, 12), seed=0, skip=["b.weight"], between=False)
    assert report["a"].status == LayerStatus.EXCLUDED


def test_a_rescaling_of_the_bias_alone_is_reported_as_rescaled() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.block, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.inp(x))
            return self.out(h + self.block(h))

    torch.manual_seed(16)
    model = Residual()
    with torch.no_grad():
        model.inp.weight.mul_(10.0)
        model.inp.bias.mul_(10.0)
    bias = model.block.bias.detach().clone()
    report = magicinit.rescale_(model, torch.randn(64, 6), seed=0)
    entry = report["block"]
    assert entry.weight_scale == 1.0 and not torch.equal(model.block.bias, bias)
    assert entry.status == LayerStatus.RESCALED


def test_a_transposed_weight_has_one_channel_rate_per_output_channel() -> None:
    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.out = nn.Parameter(torch.randn(5, 3)), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(F.linear(x, self.w.t())))  # (3, 5): 3 output channels

    torch.manual_seed(17)
    transposed, x = Transposed(), torch.randn(32, 5)
    plain = nn.Sequential(nn.Linear(5, 3, bias=False), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        plain[0].weight.copy_(transposed.w.t())
        plain[2].load_state_dict(transposed.out.state_dict())
    seen = magicinit.diagnose(transposed, x, seed=4)["w"]
    expected = magicinit.diagnose(plain, x, seed=4)["0"]  # the same map as a Linear: the same noise, the same rates
    assert len(seen.channel_std) == 3
    assert seen.rate_mean == pytest.approx(expected.rate_mean, rel=1e-5)
    assert seen.rate_cv == pytest.approx(expected.rate_cv, rel=1e-4)


def test_a_parametrization_without_parameters_is_left_as_is() -> None:
    class Double(nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return 2 * weight

    layer = nn.Linear(6, 6)
    weight = layer.weight.detach().clone()
    del layer.weight
    layer.register_buffer("weight", weight)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Double())
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), layer, nn.ReLU(), nn.Linear(6, 2))
    saved = state_copy(layer)  # its bias and the weight the parametrization reads
    report = magicinit.init_(model, torch.randn(32, 4), seed=0, between=False)
    assert report["0"].status == report["4"].status == LayerStatus.INITIALIZED
    assert_same_state(layer, saved)  # left alone, bit for bit
    assert torch.equal(layer.weight, 2 * weight)
