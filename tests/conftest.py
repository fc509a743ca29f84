"""Shared model builders and measurements for the tests (all data is generated)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import settings
from torch import nn

import magicinit
from magicinit.tools import nets

# The default run draws the same examples every time, so that a test run (and CI)
# is reproducible; `--hypothesis-profile=explore --hypothesis-seed=N` draws new ones.
settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("reproducible")

AFFINE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def plain_cnn(depth: int = 6, width: int = 8, in_channels: int = 3, classes: int = 5) -> nn.Sequential:
    """The zoo's plain ReLU CNN (no batch norm), small by default: ``depth`` affine layers in all."""
    return nets.plain_cnn(depth, width, in_channels=in_channels, classes=classes)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class ResNetNoBN(nn.Module):
    """A ResNet without batch norm: stem, residual blocks, a projection shortcut, linear head."""

    def __init__(self, width: int = 8, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(width, 2 * width, 1, stride=2)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        x = torch.relu(self.down(x)) + self.shortcut(x)
        return self.head(x.mean(dim=(2, 3)))


class ConcatNet(nn.Module):
    """Inception-like: two branches (one grouped, one depthwise + pointwise) concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch_a = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.branch_b1 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.branch_b2 = nn.Conv2d(8, 4, 1)
        self.up = nn.ConvTranspose2d(12, 6, 2, stride=2, groups=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.cat([torch.relu(self.branch_a(x)), torch.relu(self.branch_b2(torch.relu(self.branch_b1(x))))], dim=1)
        x = nn.functional.leaky_relu(self.up(nn.functional.avg_pool2d(x, 2)), 0.1)
        return self.head(torch.flatten(nn.functional.adaptive_max_pool2d(x, 1), 1))


class Conv1d3dNet(nn.Module):
    """Conv1d and Conv3d layers, a dilated and a strided one, a bias-less one, a sequence Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(2, 4, 3, padding=1, dilation=1)
        self.c1 = nn.Conv1d(4, 6, 3, dilation=2, stride=2, bias=False)
        self.seq = nn.Linear(6, 5)
        self.t1 = nn.ConvTranspose1d(5, 3, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c3(x)).mean(dim=(3, 4))  # (N, 4, D)
        x = torch.relu(self.c1(x))  # (N, 6, L)
        x = torch.relu(self.seq(x.transpose(1, 2))).transpose(1, 2)  # Linear over a sequence
        return self.t1(x)


ARCHITECTURES = {
    "plain": (lambda: plain_cnn(6), (3, 12, 12)),
    "resnet": (lambda: ResNetNoBN(), (3, 8, 8)),
    "concat": (lambda: ConcatNet(), (3, 8, 8)),
    "conv1d3d": (lambda: Conv1d3dNet(), (2, 6, 4, 4)),
}


def first_call_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output of every affine layer's first call in a fresh no-grad forward pass."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str, output: torch.Tensor) -> None:
        outputs.setdefault(name, output.detach().clone())

    handles = [
        m.register_forward_hook(lambda m, a, o, n=n: keep(n, o))
        for n, m in model.named_modules()
        if isinstance(m, AFFINE)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outputs


def channel_stats(module: nn.Module, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std of a layer output, in float64."""
    channel = output.dim() - 1 if isinstance(module, nn.Linear) else 1
    dims = tuple(d for d in range(output.dim()) if d != channel)
    var, mean = torch.var_mean(output.double(), dim=dims, correction=0)
    return mean, var.sqrt()


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Every entry of the state dict bit-identical to ``saved`` (a :func:`state_copy`)."""
    assert model.state_dict().keys() == saved.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), f"{key} changed"


def assert_no_trace(model: nn.Module, training: bool = True) -> None:
    """No hook left on any module, every module in the ``training`` mode it was in, every parameter still
    requiring grad and holding no ``.grad``: what a call must leave behind whether it finished or not."""
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, module
        assert module.training is training, module
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def assert_untouched(model: nn.Module, saved: dict[str, torch.Tensor], training: bool = True) -> None:
    """The model exactly as it was before a call that failed or had nothing to do: the same state bit for bit
    (``saved`` is a :func:`state_copy`), and no trace of the call (:func:`assert_no_trace`)."""
    assert_same_state(model, saved)
    assert_no_trace(model, training)


def assert_unit_channels(
    model: nn.Module, x: torch.Tensor, report: magicinit.Report | None = None, beta: float = 0.0, atol: float = 1e-3
) -> None:
    """Part 1's promise, measured here independently of magicinit on ``x`` (the init data): every output
    channel of every layer the ``report`` lists as initialized (without a report: of every conv/linear layer)
    has population std 1 and, where the layer has a bias, mean ``beta``. Channels the report lists as
    zero-variance (no signal on ``x``) are exempt from the std; a layer without a bias must say so in its notes.
    A layer reported ``constant`` must be constant in every channel (measured: std 0 to rounding)."""
    outputs = first_call_outputs(model, x)
    modules = dict(model.named_modules())
    if report is None:
        checked = [(name, ()) for name in outputs]
    else:
        checked = []
        for entry in report.layers:
            if entry.status == "constant":  # every channel without signal on x: said, and measured here
                assert len(entry.zero_variance_channels) == len(entry.channel_std_after), entry.name
                _, std = channel_stats(modules[entry.name], outputs[entry.name])
                assert float(std.max()) <= atol, (entry.name, std)
                continue
            assert entry.status == "initialized", (entry.name, entry.status)
            checked.append((entry.name, entry.zero_variance_channels))
            if modules[entry.name].bias is None:
                assert any("no bias" in note for note in entry.notes), (entry.name, entry.notes)
    assert checked, "no layer to check"
    for name, zero_variance in checked:
        mean, std = channel_stats(modules[name], outputs[name])
        live = torch.ones_like(std, dtype=torch.bool)
        live[list(zero_variance)] = False
        assert torch.allclose(std[live], torch.ones_like(std[live]), atol=atol), (name, std)
        if modules[name].bias is not None:
            assert torch.allclose(mean, torch.full_like(mean, beta), atol=atol), (name, mean)


class PatchCounter:
    """A sampler that hands every request to the registered sampler ``name`` and records, per layer, the most
    input patches that sampler took from the layer's input in one call of ``request.input_patches`` (the
    request's way to a layer's patches): ``patches[layer name]``, all groups together."""

    def __init__(self, name: str) -> None:
        self.sampler = magicinit.SAMPLERS[name]
        self.patches: dict[str, int] = {}

    def __call__(self, request: magicinit.SamplerRequest) -> torch.Tensor:
        def input_patches(layer_input: torch.Tensor) -> torch.Tensor | None:
            patches = request.input_patches(layer_input)
            if patches is not None:
                count = patches.shape[0] * patches.shape[1]
                self.patches[request.name] = max(self.patches.get(request.name, 0), count)
            return patches

        return self.sampler(dataclasses.replace(request, input_patches=input_patches))


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; a dead network (b == 0 exactly) must then give a == 0 too."""
    diff = float((a.double() - b.double()).norm())
    norm = float(b.double().norm())
    return diff / norm if norm > 0 else diff


def rescale_keeping_function(
    model: nn.Module, x: torch.Tensor, tolerance: float = 1e-4, **options: object
) -> magicinit.Report:
    """``magicinit.rescale_(model, x, **options)``, asserting that the outputs on ``x`` stay within ``tolerance``."""
    with torch.no_grad():
        before = model(x)
    report = magicinit.rescale_(model, x, **options)
    with torch.no_grad():
        assert relative_change(model(x), before) < tolerance
    return report


def geometric_spread(rates: list[float]) -> float:
    """Largest relative deviation of any rate from the geometric mean."""
    g = math.exp(sum(math.log(r) for r in rates) / len(rates))
    return max(abs(r / g - 1) for r in rates)


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    torch.manual_seed(1234)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test at one torch thread (restored after): its float32 reductions in one order, as in the
    whole suite, where test modules set one thread at import."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise_rates(
    model: nn.Module, x: torch.Tensor, weights: dict[str, torch.Tensor], rounds: int = 2, seed: int = 99
) -> dict[str, float]:
    """Change rates measured here, independently of magicinit: ``sqrt(E||dL/dW||^2 / ||W||^2)`` with
    ``L = noise . model(sample)``, one sample per draw, ``rounds`` draws per sample, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    totals = {name: 0.0 for name in weights}
    training = model.training
    model.eval()
    try:
        for _ in range(rounds):
            for i in range(len(x)):
                out = model(x[i : i + 1])
                noise = torch.randn(out.shape, generator=generator)
                grads = torch.autograd.grad(out, list(weights.values()), grad_outputs=noise)
                for name, grad in zip(weights, grads):
                    totals[name] += float(grad.double().square().sum())
    finally:
        model.train(training)
    draws = rounds * len(x)
    return {
        name: math.sqrt(totals[name] / draws / float(w.detach().double().square().sum())) for name, w in weights.items()
    }


def affine_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight of every conv/linear module, by module name."""
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, AFFINE)}


def interrupt_the_second_rate_measurement(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make Part 2's second change-rate measurement (the one after the scales were applied) raise
    ``KeyboardInterrupt``, as a Ctrl-C at that instant would; the list returned grows by one per measurement."""
    from magicinit._core import between

    measure = between.measure_change_rates
    calls: list[int] = []

    def interrupted_after_first(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(between, "measure_change_rates", interrupted_after_first)
    return calls


@contextmanager
def recording_later_rounds() -> Iterator[list[list[int]]]:
    """Within it, the change-rate measurement's rounds after the second append the chunks they draw (with
    repeats, in order) to the list it yields; the measurement itself is unchanged. A context manager, not a
    fixture, so that spawned processes (``test_distributed``) use it too."""
    from magicinit._core.rates import measure

    drawn: list[list[int]] = []
    original = measure._next_draws

    def recording(*args: Any) -> list[int]:
        drawn.append(original(*args))
        return drawn[-1]

    measure._next_draws = recording  # type: ignore[assignment]
    try:
        yield drawn
    finally:
        measure._next_draws = original
