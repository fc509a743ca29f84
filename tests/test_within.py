"""Part 1: exact channel statistics, one forward pass, samplers, edge cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import magicinit
from conftest import (
    AFFINE,
    ARCHITECTURES,
    ResNetNoBN,
    assert_same_state,
    assert_unit_channels,
    channel_stats,
    first_call_outputs,
    plain_cnn,
    state_copy,
)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_every_channel_has_mean_beta_and_unit_std(arch: str, beta: float) -> None:
    build, shape = ARCHITECTURES[arch]
    model = build()
    x = torch.randn(32, *shape) * 3 + 1
    report = magicinit.init_(model, x, between=False, beta=beta, seed=0)
    assert not any(entry.zero_variance_channels for entry in report.layers)  # Gaussian data: every channel lives
    assert_unit_channels(model, x, report, beta)


def test_part1_is_one_forward_pass_not_one_per_layer() -> None:
    model = plain_cnn(8)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    magicinit.init_(model, torch.randn(16, 3, 8, 8), between=False, seed=0)
    # one probe pass on 2 samples (graph), one pass over the data (Part 1); no layer's output can change after
    # its own normalization (no shared bias, no constant channel), so nothing is re-measured for the report
    assert len(calls) == 2
    assert not model._forward_hooks and len(model._forward_pre_hooks) == 1


def test_the_report_after_part_1_is_what_the_model_gives_without_a_remeasuring_pass() -> None:
    torch.manual_seed(0)
    model, x = plain_cnn(8), torch.randn(32, 3, 8, 8)
    report = magicinit.init_(model, x, between=False, seed=0)
    captured: dict[str, torch.Tensor] = {}
    convs = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)}
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: captured.__setitem__(name, out.detach()))
        for name, module in convs.items()
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    for name, output in captured.items():
        std = output.transpose(0, 1).flatten(1).std(1, correction=0)
        assert torch.allclose(torch.tensor(report[name].channel_std_after), std, rtol=1e-4, atol=1e-5), name


def test_same_seed_gives_bit_identical_weights_and_other_seed_does_not() -> None:
    x = torch.randn(24, 3, 8, 8)
    states = []
    for seed in (7, 7, 8):
        model = ResNetNoBN()
        magicinit.init_(model, x, seed=seed)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_without_seed_uses_torch_global_generator() -> None:
    x = torch.randn(8, 3, 8, 8)
    weights = []
    for _ in range(2):
        torch.manual_seed(3)
        model = plain_cnn(3)
        magicinit.init_(model, x, between=False)
        weights.append(model[0].weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_orthogonal_sampler_gives_orthogonal_filter_directions() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 12)
    )
    magicinit.init_(model, torch.randn(16, 3, 8, 8), sampler="orthogonal", between=False, seed=0)
    for module, groups in ((model[0], 1), (model[2], 2), (model[5], 1)):
        filters = module.weight.detach().reshape(groups, module.weight.shape[0] // groups, -1)
        directions = filters / filters.norm(dim=-1, keepdim=True)
        gram = directions @ directions.transpose(1, 2)
        eye = torch.eye(gram.shape[-1]).expand_as(gram)
        assert torch.allclose(gram, eye, atol=1e-5)


def test_keep_sampler_only_rescales_and_shifts_existing_filters() -> None:
    model = plain_cnn(4)
    before = [m.weight.detach().clone() for m in model.modules() if isinstance(m, AFFINE)]
    magicinit.init_(model, torch.randn(16, 3, 8, 8), sampler="keep", between=False)
    after = [m.weight.detach() for m in model.modules() if isinstance(m, AFFINE)]
    for old, new in zip(before, after):
        ratio = new.flatten(1) / old.flatten(1)
        assert (ratio > 0).all()
        assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)


def test_zero_variance_channel_gets_safe_scale_and_is_reported() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[1] = 0.0  # channel 1 is constant on any data
    x = torch.randn(64, 4)
    report = magicinit.init_(model, x, sampler="keep", between=False, beta=0.1)
    assert report["0"].zero_variance_channels == [1]
    assert any("constant" in note for note in report["0"].notes)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    out = first_call_outputs(model, x)["0"]
    assert torch.allclose(out[:, 1], torch.full((64,), 0.1))


def test_constant_data_gives_finite_weights() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    report = magicinit.init_(model, torch.ones(16, 5), seed=0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert report["0"].zero_variance_channels == [0, 1, 2, 3]
    assert torch.isfinite(model(torch.randn(3, 5))).all()


def test_dataloader_of_pairs_list_of_batches_and_sample_cap() -> None:
    x = torch.randn(40, 3, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.zeros(40)), batch_size=16)
    model = plain_cnn(4)
    report = magicinit.init_(model, loader, samples=20, between=False, seed=0)
    assert report.settings["samples_used"] == 20
    outputs = first_call_outputs(model, x[:20])
    _mean, std = channel_stats(model[0], outputs["0"])
    assert torch.allclose(std, torch.ones_like(std), atol=1e-3)
    report = magicinit.init_(plain_cnn(4), [x[:10], x[10:30]], between=False, seed=0)
    assert report.settings["samples_used"] == 30


def test_forward_callable_for_dict_batches() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(2, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.a(left) + self.b(right)))

    batch = {"left": torch.randn(32, 3), "right": torch.randn(32, 2)}
    model = TwoInputs()
    report = magicinit.init_(model, batch, forward=lambda m, b: m(b["left"], b["right"]), seed=0)
    assert {e.name for e in report.layers if e.status in ("initialized", "rescaled")} == {"a", "b", "head"}


def test_shared_layer_normalized_on_first_call_and_reported() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 6)
            self.shared = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.shared(torch.relu(self.shared(torch.relu(self.inp(x)))))))

    model = Shared()
    x = torch.randn(64, 4)
    report = magicinit.init_(model, x, between=False, seed=0)
    assert report["shared"].calls == 2
    assert any("used at 2 affine sites" in note and "not normalized" in note for note in report["shared"].notes)
    _mean, std = channel_stats(model.shared, first_call_outputs(model, x)["shared"])
    assert torch.allclose(std, torch.ones_like(std), atol=1e-3)


def test_layer_never_called_is_left_untouched_and_reported() -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = plain_cnn(3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    model = WithSpare()
    weight = model.unused.weight.detach().clone()
    report = magicinit.init_(model, torch.randn(8, 3, 8, 8), seed=0)
    assert torch.equal(model.unused.weight, weight)
    assert report["unused"].status == "never called"


def test_layer_before_batch_norm_is_normalized_and_bn_state_untouched_by_part1() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 3))
    model.train()
    bn_state = state_copy(model[1])
    x = torch.randn(16, 3, 8, 8)
    report = magicinit.init_(model, x, seed=0, between=False)
    assert model.training and model[1].training
    assert_same_state(model[1], bn_state)
    assert model[1].eps == 1e-5
    _, std = channel_stats(model[0], first_call_outputs(model, x)["0"])
    assert torch.allclose(std, torch.ones_like(std), atol=1e-4)
    assert report["0"].status == "initialized"


def test_float64_and_bfloat16_models() -> None:
    x = torch.randn(32, 3, 8, 8)
    model = plain_cnn(4).double()
    magicinit.init_(model, x, between=False, seed=0)  # float data is cast to the model's dtype
    mean, std = channel_stats(model[2], first_call_outputs(model, x.double())["2"])
    assert torch.allclose(std, torch.ones_like(std), atol=1e-12)  # float64 end to end
    assert mean.abs().max() < 1e-12
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(torch.bfloat16)
    xb = torch.randn(64, 6)
    magicinit.init_(model, xb, between=False, seed=0)
    assert model[0].weight.dtype == torch.bfloat16
    _mean, std = channel_stats(model[0], first_call_outputs(model, xb.bfloat16())["0"])
    assert torch.allclose(std, torch.ones_like(std), atol=3e-2)
