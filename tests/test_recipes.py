"""The recipes of docs/guide.md run as written, and do what they say: each block marked
``<!-- recipe: NAME -->`` is executed, and the model it initializes is measured here by hooks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import magicinit
from conftest import channel_stats, first_call_outputs, state_copy

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide.md"


def recipes() -> dict[str, str]:
    """The guide's recipe blocks, by name."""
    found = re.findall(r"<!-- recipe: ([\w-]+) -->\n```python\n(.*?)```", GUIDE.read_text(), re.S)
    return dict(found)


def test_the_guide_has_its_recipes() -> None:
    assert set(recipes()) == {"plain-loop", "lightning", "accelerate", "fine-tuning", "custom-sampler"}


class InitSpy:
    """Wraps ``magicinit.init_``: records each call's model with its weights before and right after."""

    def __init__(self) -> None:
        self.calls: list[tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self.original = magicinit.init_

    def __call__(self, model: nn.Module, data: Any, **options: Any) -> magicinit.Report:
        before = state_copy(model)
        report = self.original(model, data, **options)
        self.calls.append((model, before, state_copy(model)))
        return report


def run_recipe(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[dict[str, Any], InitSpy]:
    spy = InitSpy()
    monkeypatch.setattr(magicinit, "init_", spy)
    if name == "lightning":  # the callback's own reference to init_
        monkeypatch.setattr("magicinit.lightning.init_", spy)
    namespace: dict[str, Any] = {"workdir": tmp_path, "__name__": f"guide_{name.replace('-', '_')}"}
    torch.manual_seed(0)
    exec(compile(recipes()[name], f"docs/guide.md:{name}", "exec"), namespace)
    return namespace, spy


def channel_statistics(
    model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per affine layer: channel means and stds of its output on ``x``, with ``weights`` loaded."""
    current = state_copy(model)
    model.load_state_dict(weights)
    try:
        modules = dict(model.named_modules())
        return {
            name: channel_stats(modules[name], output) for name, output in first_call_outputs(model.eval(), x).items()
        }
    finally:
        model.load_state_dict(current)


def assert_part1_on_other_samples(stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Every conv channel near mean 0 and, within each layer, one std (Part 2 rescales whole layers), on the
    recipe's images: the init data (or, where a shuffled loader drew it, some of them). Torch's default init
    is far from both (relative means of 0.3 and more after the first ReLU)."""
    convs = [name for name in stats if stats[name][0].numel() > 10]
    assert convs
    for name in convs:
        mean, std = stats[name]
        assert (mean.abs() / std).max() < 0.15, name
        assert std.std() / std.mean() < 0.08, name


@pytest.mark.slow
def test_plain_loop(monkeypatch, tmp_path) -> None:
    namespace, spy = run_recipe("plain-loop", monkeypatch, tmp_path)
    ((model, _before, after),) = spy.calls
    assert model is namespace["model"]
    assert_part1_on_other_samples(channel_statistics(model, after, namespace["images"]))
    trained = model.state_dict()  # and training moved on from there
    assert any(not torch.equal(trained[k], after[k]) for k in after)


def test_lightning(monkeypatch, tmp_path) -> None:
    pytest.importorskip("lightning")
    namespace, spy = run_recipe("lightning", monkeypatch, tmp_path)
    ((module, _before, after),) = spy.calls
    assert module is namespace["module"] and namespace["callback"].report is not None
    assert_part1_on_other_samples(channel_statistics(module, after, namespace["images"]))


@pytest.mark.slow
def test_accelerate(monkeypatch, tmp_path) -> None:
    pytest.importorskip("accelerate")
    namespace, spy = run_recipe("accelerate", monkeypatch, tmp_path)
    ((model, _before, after),) = spy.calls
    assert_part1_on_other_samples(channel_statistics(model, after, namespace["images"]))


def test_fine_tuning_initializes_the_head_alone(monkeypatch, tmp_path) -> None:
    namespace, spy = run_recipe("fine-tuning", monkeypatch, tmp_path)
    ((model, before, after),) = spy.calls
    for name, tensor in before.items():
        if name.startswith("backbone."):
            assert torch.equal(after[name], tensor), name  # the pre-trained backbone, untouched
        else:
            assert not torch.equal(after[name], tensor), name
    stats = channel_statistics(model, after, namespace["images"])
    mean, std = stats["head.2"]  # the output layer: Part 1's unit channels on the init data, exactly
    torch.testing.assert_close(std, torch.ones_like(std), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-4)
    _hidden_mean, hidden_std = stats["head.0"]  # rescaled as a whole by Part 2: one std for all channels
    assert hidden_std.std() / hidden_std.mean() < 1e-3


def test_custom_sampler_draws_the_least_typical_patches_and_part1_normalizes_them(monkeypatch, tmp_path) -> None:
    namespace, spy = run_recipe("custom-sampler", monkeypatch, tmp_path)
    ((model, _before, after),) = spy.calls
    images = namespace["images"]
    stats = channel_statistics(model, after, images)  # by hooks, on the init data
    assert set(stats) == {"0", "2", "6"}
    for name, (mean, std) in stats.items():  # Part 1: mean 0; Part 2 then scales whole layers
        assert (mean.abs() / std).max() < 1e-3, name
        assert std.std() / std.mean() < 1e-3, name
    torch.testing.assert_close(stats["6"][1], torch.ones_like(stats["6"][1]), rtol=0, atol=1e-3)  # output: still 1

    # The first layer's filters, up to each one's positive scale, are what the recipe says: whitened onto the
    # top 16 principal directions of the layer's input patches (all of them: 64 x 100 < 512 x 16), the 16 of
    # largest norm, mapped back through the whitening. Computed here from the patches, in float64.
    patches = nn.functional.unfold(images.double(), 3).transpose(1, 2).reshape(-1, 27)
    centred = patches - patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(centred))
    top_values, top_vectors = eigenvalues.flip(0)[:16], eigenvectors.flip(1)[:, :16]
    transform = top_vectors.T / top_values.sqrt().unsqueeze(1)  # (16, 27): whitening onto the top directions
    whitened = centred @ transform.T
    farthest = whitened.norm(dim=1).topk(16).indices
    expected = whitened[farthest] @ transform  # (16 filters, 27)
    filters = after["0.weight"].double().reshape(16, 27)
    outside = (filters - filters @ top_vectors @ top_vectors.T).norm(dim=1) / filters.norm(dim=1)
    assert outside.max() < 1e-4, outside  # in the span of the top 16 directions (of 27)
    cosine = nn.functional.cosine_similarity(filters, expected, dim=1)
    assert cosine.min() > 1 - 1e-4, cosine
