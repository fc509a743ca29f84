"""Forwards that break magicinit's passes in their own ways (issue 26): checkpointing, gradients switched off,
batch norm without running statistics, a forward that fails on its first call; and the model's names and hooks
(a torch.compile'd model's skip names, global forward hooks)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.utils.checkpoint as checkpointing
from torch import nn

import magicinit
from conftest import assert_unit_channels, assert_untouched, state_copy
from magicinit import MagicInitError
from magicinit._core.session import check_skip_names


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


class _Checkpointed(nn.Module):
    """A checkpointed block (after a stem, or on the model's input) and a head."""

    def __init__(self, use_reentrant: bool | None, stem: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, 4), nn.ReLU()) if stem else nn.Identity()
        self.block, self.head = _mlp(), nn.Linear(3, 2)
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_reentrant is None:
            return self.head(self.block(self.stem(x)))
        return self.head(checkpointing.checkpoint(self.block, self.stem(x), use_reentrant=self.use_reentrant))


# after a stem, torch's reentrant checkpointing refuses torch.autograd.grad; on the model's input (which needs
# no gradient), it gives the block's weights no gradient at all: their change rates were 0
@pytest.mark.parametrize("stem", [True, False])
def test_reentrant_checkpointing_gives_the_weights_of_the_plain_forward(stem: bool) -> None:
    x = torch.randn(48, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    start = _Checkpointed(None, stem).state_dict()
    weights = {}
    for use_reentrant in (None, True):
        model = _Checkpointed(use_reentrant, stem)
        model.load_state_dict(start)
        magicinit.init_(model, x, seed=0)
        weights[use_reentrant] = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, plain in weights[None].items():
        assert torch.allclose(weights[True][name], plain, rtol=1e-5, atol=1e-6), name
    assert checkpointing.CheckpointFunction.__name__ == "CheckpointFunction"  # torch's own, put back


class _NoGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _InferenceMode(_NoGrad):
    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("model_type", [_NoGrad, _InferenceMode])
@pytest.mark.parametrize("entry", ["init_", "rescale_", "diagnose"])
def test_a_forward_without_gradients_is_refused_for_part_2_and_part_1_alone_works(
    model_type: type[nn.Module], entry: str
) -> None:
    torch.manual_seed(0)
    model, x = model_type(), torch.randn(32, 4)
    saved = state_copy(model)
    with pytest.raises(MagicInitError, match=r"no gradient.*'net\.0'.*torch\.no_grad.*between=False"):
        getattr(magicinit, entry)(model, x, seed=0)
    assert_untouched(model, saved)
    if entry == "init_":
        report = magicinit.init_(model, x, seed=0, between=False)
        assert_unit_channels(model, x, report)


def test_an_output_without_any_gradient_suggests_gradients_switched_off() -> None:
    class Detached(nn.Module):  # the weights are a parameter of the root, read in its own forward
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return nn.functional.linear(x, self.weight)

    model = Detached()
    saved = state_copy(model)
    with pytest.raises(MagicInitError, match=r"does not depend on any initialized weight.*torch\.no_grad"):
        magicinit.diagnose(model, torch.randn(16, 4))
    assert_untouched(model, saved)


def _batch_norm_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3)
    )


@pytest.mark.parametrize(("samples", "chunk"), [(32, 1), (33, 2)])
def test_batch_norm_without_running_statistics_is_refused_on_chunks_of_one_sample(samples: int, chunk: int) -> None:
    torch.manual_seed(0)
    model, x = _batch_norm_net(), torch.randn(samples, 4)
    saved = state_copy(model)
    with pytest.raises(MagicInitError, match=r"layer '1' \(BatchNorm1d, track_running_stats=False\).*rate_chunk_size"):
        magicinit.init_(model, x, seed=0, rate_chunk_size=chunk, across_normalization=True)
    assert_untouched(model, saved)
    with pytest.raises(MagicInitError, match="layer '1'"):
        magicinit.diagnose(model, x, rate_chunk_size=chunk)
    assert_untouched(model, saved)


def test_batch_norm_without_running_statistics_works_on_larger_chunks_and_in_part_1() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    model = _batch_norm_net()
    reference = model(x)  # training mode: batch statistics, as in eval mode without running statistics
    magicinit.rescale_(model, x, seed=0, rate_chunk_size=8, across_normalization=True)
    assert torch.allclose(model(x), reference, rtol=1e-4, atol=1e-5)  # the function is kept
    diagnosis = magicinit.diagnose(model, x, rate_chunk_size=8)
    assert all(layer.rate > 0 for layer in diagnosis.layers)
    report = magicinit.init_(_batch_norm_net(), x, seed=0, between=False)
    assert all(layer.status == "initialized" for layer in report.layers)


class _FailsOnFirstCall(nn.Module):
    """A lazy setup that raises on the first call and is done after it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.ready = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            self.ready = True
            raise RuntimeError("setup not done yet")
        return self.net(x)


def test_a_forward_that_fails_on_its_first_call_alone_is_said_to() -> None:
    model = _FailsOnFirstCall()
    saved = state_copy(model)
    with pytest.raises(MagicInitError, match=r"first call.*setup not done yet.*run one forward pass") as caught:
        magicinit.init_(model, torch.randn(16, 4), seed=0)
    assert "TorchFunctionMode" not in str(caught.value)
    assert_untouched(model, saved)
    fresh = _FailsOnFirstCall()
    with pytest.raises(RuntimeError, match="setup not done yet"):  # the remedy: one forward pass first
        fresh(torch.randn(2, 4))
    magicinit.init_(fresh, torch.randn(16, 4), seed=0)


@pytest.mark.slow  # torch.compile's first use imports dynamo (seconds)
def test_skip_names_of_a_compiled_model_are_accepted() -> None:
    torch.manual_seed(0)
    model = _mlp()
    compiled = torch.compile(model)  # not called: magicinit works on the module it wraps
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    magicinit.init_(compiled, torch.randn(32, 4), seed=0, skip=["_orig_mod.2", "_orig_mod.4.bias"])
    for name, parameter in model.named_parameters():
        kept = name.startswith("2.") or name == "4.bias"
        assert torch.equal(parameter, saved[name]) == kept, name
    assert check_skip_names(compiled, ["_orig_mod.2", "4", "_orig_mod"]) == ["2", "4", ""]
    assert check_skip_names(model, "_orig_mod.2.weight") == ["2.weight"]
    with pytest.raises(MagicInitError, match=r"skip: no module or parameter named '_orig_mod\.9'"):
        check_skip_names(compiled, ["_orig_mod.9"])
    with pytest.raises(MagicInitError, match="skip: no module or parameter named 'head'"):
        magicinit.init_(compiled, torch.randn(32, 4), skip=["head"])


def test_global_forward_hooks_are_noted_like_the_modules_own() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    calls: list[str] = []

    def doubling(module: nn.Module, args: Any, output: Any) -> Any:
        calls.append(type(module).__name__)
        return output * 2 if isinstance(module, nn.ReLU) else None

    handle = nn.modules.module.register_module_forward_hook(doubling)
    try:
        report = magicinit.init_(_mlp(), x, seed=0)
    finally:
        handle.remove()
    assert "ReLU" in calls  # the hook ran during the call
    assert any("forward hooks of your own on every module (1 global" in note for note in report.notes)
    assert not any("forward hooks of your own" in note for note in magicinit.init_(_mlp(), x, seed=0).notes)
