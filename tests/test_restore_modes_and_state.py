"""Issue 25, part 2: the model is left as it was, nothing is left behind. Buffers the model's own forward
updates (a call counter, even in eval mode) are as they were after a failed call, bit for bit, and after a
successful one too (but the running statistics Part 2 scales on purpose); modes are restored through the
modules' own ``train()``, so that an overridden ``train()`` (timm's LeViT, torchvision's two-graph feature
extractors) runs; and no module attribute keeps a tensor with autograd history, so the model can be
deep-copied. Everything here is measured by the test itself, not read from magicinit's report."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import magicinit
from conftest import assert_same_state, interrupt_the_second_rate_measurement, plain_cnn, state_copy
from magicinit import MagicInitError

FAST = {"rate_precision": 0.2, "rate_max_rounds": 2}
ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "init_": lambda model, x, **kw: magicinit.init_(model, x, seed=0, **FAST, **kw),
    "rescale_": lambda model, x, **kw: magicinit.rescale_(model, x, seed=0, **FAST, **kw),
    "diagnose": lambda model, x, **kw: magicinit.diagnose(model, x, **FAST, **kw),
}


def graph_holding_attributes(model: nn.Module) -> list[str]:
    """Where a module attribute (outside parameters and submodules, in dicts, lists and tuples too) holds a
    tensor with a ``grad_fn``: what makes ``copy.deepcopy`` fail."""
    found = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.grad_fn is not None:
                found.append(where)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}[{key!r}]")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")

    for name, module in model.named_modules():
        for attribute, value in vars(module).items():
            if attribute not in ("_parameters", "_modules"):
                walk(value, f"{name or '<model>'}.{attribute}")
    return found


def assert_left_clean(model: nn.Module) -> None:
    """No tensor with autograd history in any module attribute, and the model deep-copies."""
    assert graph_holding_attributes(model) == []
    copy.deepcopy(model)


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


# --- 1. buffers a forward updates ---------------------------------------------------------------------------


class CountsCalls(nn.Module):
    """A plain CNN with a call counter kept in a buffer (updated even in eval mode), that raises ``ValueError``
    on its first call with grad enabled if ``fail_with_grad`` (Part 2's rate measurement, or diagnose's)."""

    def __init__(self, fail_with_grad: bool = False, norm: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8) if norm else nn.Identity(),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 8 * 8, 5),
        )
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_mean", torch.zeros(()))
        self.fail_with_grad = fail_with_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.last_mean.copy_(x.detach().mean())
        if self.fail_with_grad and torch.is_grad_enabled():
            raise ValueError("fails with grad")
        return self.net(x)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_failed_call_puts_back_buffers_the_forward_updated(entry: str) -> None:
    model = CountsCalls(fail_with_grad=True)
    saved = state_copy(model)
    with pytest.raises(MagicInitError, match="ValueError: fails with grad"):
        ENTRY_POINTS[entry](model, torch.randn(8, 3, 8, 8))
    assert_same_state(model, saved)  # the counter included: the tracing pass and Part 1 counted calls
    assert int(model.calls) == 0


@pytest.mark.parametrize("entry", ["init_", "rescale_"])
def test_an_interrupted_call_puts_back_buffers_the_forward_updated(entry: str, monkeypatch) -> None:
    model = CountsCalls()
    saved = state_copy(model)
    calls = interrupt_the_second_rate_measurement(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ENTRY_POINTS[entry](model, torch.randn(8, 3, 8, 8), verify_rates=True)
    assert len(calls) == 2
    assert_same_state(model, saved)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_successful_call_leaves_the_forwards_counter_as_it_was(entry: str) -> None:
    model = CountsCalls()
    model(torch.randn(2, 3, 8, 8))  # the user's own call counts
    ENTRY_POINTS[entry](model, torch.randn(8, 3, 8, 8))
    assert int(model.calls) == 1
    assert float(model.last_mean) != 0.0  # the user's call's, bit for bit: magicinit's did not stay
    x = torch.randn(2, 3, 8, 8)
    model(x)
    assert int(model.calls) == 2 and float(model.last_mean) == float(x.mean())


def test_running_statistics_part2_scales_stay_and_the_counter_is_put_back() -> None:
    model = CountsCalls(norm=True)
    with torch.no_grad():
        for _ in range(5):  # running statistics of some size
            model(3 * torch.randn(16, 3, 8, 8) + 1)
    model.eval()
    counted = int(model.calls)
    x = 3 * torch.randn(16, 3, 8, 8) + 1
    with torch.no_grad():
        before = model(x)
    running = model.net[1].running_var.clone()
    report = magicinit.rescale_(model, x, seed=0, across_normalization=True, rate_precision=0.1)
    assert "net.1" in report.normalizations
    assert not torch.equal(model.net[1].running_var, running)  # scaled with the norm's input
    assert int(model.calls) == counted + 1  # the call above, not magicinit's
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)


class ReplacesItsCache(nn.Module):
    """A forward that replaces a buffer with a new tensor of another shape (a cache rebuilt for longer inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("cache", torch.zeros(1, 4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache.shape[0] < x.shape[0]:
            self.cache = torch.ones(x.shape[0], 4)
        return self.linear(x + self.cache[: x.shape[0]])


def test_a_buffer_the_forward_replaced_is_put_back_as_the_same_tensor() -> None:
    model = ReplacesItsCache()
    cache = model.cache
    magicinit.init_(model, torch.randn(16, 4), seed=0, rate_precision=0.2)
    assert model.cache is cache and torch.equal(cache, torch.zeros(1, 4))


# --- 2. modes through train(), nothing with a graph left behind -----------------------------------------------


class CachesInEval(nn.Module):
    """Overrides ``train()`` (recording its calls) and caches, in eval mode, a tensor computed from its
    weight: with autograd history in Part 2's passes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.train_calls: list[bool] = []
        self.cache: dict[str, tuple[torch.Tensor, ...]] = {}

    def train(self, mode: bool = True) -> CachesInEval:
        self.train_calls.append(mode)
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if not self.training:
            self.cache["last"] = (y.mean(), [y.std()])  # type: ignore[assignment]
        return y


class FreezesItsNorm(nn.Module):
    """Keeps its batch norm in eval mode whatever ``train(mode)`` it is given (a frozen-BN fine-tuning setup)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.block = CachesInEval()
        self.head = nn.Linear(8, 4)

    def train(self, mode: bool = True) -> FreezesItsNorm:
        super().train(mode)
        self.norm.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.block(self.norm(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_modes_are_restored_through_train_and_no_graph_is_left(entry: str) -> None:
    model = FreezesItsNorm()
    model.train()
    model.head.eval()  # mixed modes: the model trains, its head and (by its own train()) its norm do not
    saved = modes(model)
    assert saved[""] and not saved["norm"] and not saved["head"] and saved["block"]
    model.block.train_calls.clear()
    ENTRY_POINTS[entry](model, torch.randn(8, 3, 8, 8))
    assert modes(model) == saved
    assert model.block.train_calls[-1] is True  # its own train() ran to put its mode back
    assert_left_clean(model)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_failed_call_restores_modes_through_train_and_leaves_no_graph(entry: str) -> None:
    model = nn.Sequential(CachesInEval(), CountsCalls(fail_with_grad=True))
    model[1] = nn.Sequential(nn.Conv2d(8, 3, 1), model[1])
    model.train()
    model[0].train_calls.clear()
    saved, state = modes(model), state_copy(model)
    with pytest.raises(MagicInitError, match="ValueError: fails with grad"):
        ENTRY_POINTS[entry](model, torch.randn(8, 8, 8, 8))
    assert modes(model) == saved and model[0].train_calls[-1] is True
    assert_same_state(model, state)
    assert_left_clean(model)


def levit() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("levit_128s", pretrained=False, img_size=64, num_classes=10)


@pytest.mark.slow  # 5 to 10 s each
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_levit_deep_copies_after_init(training: bool) -> None:
    model = levit().train(training)
    saved = modes(model)
    x = torch.randn(8, 3, 64, 64)
    report = magicinit.init_(model, x, seed=0, across_normalization=True, **FAST)  # Part 2's passes with grad
    assert report.normalizations  # LeViT normalizes every linear layer's output: Part 2 ran across them
    assert modes(model) == saved
    assert_left_clean(model)  # its attention-bias cache is filled by eval forwards, Part 2's with grad


def interrupt_with_grad(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """A forward hook: Ctrl-C on the first call with grad enabled (Part 2's first rate measurement)."""
    if torch.is_grad_enabled():
        raise KeyboardInterrupt


def test_levit_deep_copies_after_a_failed_init() -> None:
    model = levit().eval()
    state = state_copy(model)
    hook = model.head.register_forward_hook(interrupt_with_grad)
    with pytest.raises(KeyboardInterrupt):
        magicinit.init_(model, torch.randn(8, 3, 64, 64), seed=0, across_normalization=True, **FAST)
    hook.remove()
    assert_same_state(model, state)
    assert all(not module.training for module in model.modules())
    assert_left_clean(model)


def test_a_two_graph_feature_extractor_runs_its_train_graph_again() -> None:
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    extractor = feature_extraction.create_feature_extractor(
        plain_cnn(4), train_return_nodes={"6": "train_out"}, eval_return_nodes={"4": "eval_out"}
    )
    x = torch.randn(8, 3, 8, 8)
    assert extractor.training and set(extractor(x)) == {"train_out"}
    magicinit.init_(extractor, x, seed=0, rate_precision=0.2, rate_max_rounds=2)
    assert extractor.training and set(extractor(x)) == {"train_out"}
    extractor.eval()
    assert set(extractor(x)) == {"eval_out"}
    magicinit.diagnose(extractor, x, rate_precision=0.2, rate_max_rounds=2)
    assert not extractor.training and set(extractor(x)) == {"eval_out"}
    assert_left_clean(extractor)
