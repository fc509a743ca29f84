"""Part 2 on models whose outputs are selected by value (detectors), and layers with no output features."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import magicinit
from conftest import assert_untouched, channel_stats, first_call_outputs, state_copy
from magicinit import MagicInitError


class ThresholdedHeads(nn.Module):
    """A detector in miniature: box outputs kept where a score head passes a threshold. The products of
    the two heads leave their relative scale free, and the threshold makes the number of outputs depend on
    the scores' scale."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.score = nn.Linear(16, 8)
        self.box = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body(x)
        scores, boxes = self.score(hidden), self.box(hidden)
        return (boxes * scores)[scores > 0.1]

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads' outputs before the selection."""
        hidden = self.body(x)
        return self.score(hidden), self.box(hidden)


def _data() -> torch.Tensor:
    return torch.randn(64, 6, generator=torch.Generator().manual_seed(0))


def _model() -> ThresholdedHeads:
    torch.manual_seed(0)
    return ThresholdedHeads()


class HiddenThreshold(ThresholdedHeads):
    """The same selection made outside torch (in numpy), where no trace sees the comparison."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body(x)
        scores, boxes = self.score(hidden), self.box(hidden)
        keep = torch.from_numpy(scores.detach().numpy() > 0.1)
        return (boxes * scores)[keep]


def _hidden() -> HiddenThreshold:
    torch.manual_seed(0)
    return HiddenThreshold()


@pytest.mark.slow
def test_approximate_mode_on_selected_outputs_names_the_selection_and_the_remedy() -> None:
    model, x = _hidden(), _data()
    saved = state_copy(model)
    with pytest.raises(MagicInitError, match=r"outputs changed shape.*selects by value.*forward=") as error:
        magicinit.rescale_(model, x, seed=0, scale_mode="approximate", rate_precision=0.1)
    assert "RuntimeError" not in str(error.value)
    assert_untouched(model, saved)


def test_exact_mode_fixes_the_scale_a_score_threshold_reads_and_keeps_the_selection() -> None:
    model, x = _model(), _data()
    before = model(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report = magicinit.rescale_(model, x, seed=0, rate_precision=0.1)
    assert "comparison with 0.1" in (report["score"].output_scale_fixed_by or "")
    assert report["box"].weight_scale not in (None, 1.0)  # the box head's scale stays free, and is used
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-5, atol=1e-6)  # same boxes selected


def test_exact_mode_leaves_a_model_whose_hidden_selection_would_change_as_it_was_and_says_why() -> None:
    model, x = _hidden(), _data()
    saved, before = state_copy(model), model(x).detach()
    with pytest.warns(RuntimeWarning, match=r"left as it was: the model's outputs changed shape"):
        report = magicinit.rescale_(model, x, seed=0, rate_precision=0.1)
    assert_untouched(model, saved)
    assert torch.equal(model(x).detach(), before)
    assert any("not kept" in note and "changed shape" in note for note in report.notes)


def test_the_raw_head_outputs_recipe_rescales_and_keeps_the_selection() -> None:
    model, x = _model(), _data()
    before = model(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report = magicinit.rescale_(model, x, seed=0, forward=lambda net, batch: net.raw(batch))
    assert any(entry.weight_scale not in (None, 1.0) for entry in report.layers)
    scores_before = _model().raw(x)[0]
    scores_after = model.raw(x)[0]
    torch.testing.assert_close(scores_after, scores_before, rtol=1e-5, atol=1e-5)  # the heads' outputs are kept
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-4, atol=1e-5)  # and so is what they select


@pytest.mark.parametrize("empty_at", ["head", "middle"])
def test_a_layer_with_no_output_features_is_left_alone_with_a_note(empty_at: str) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own "Initializing zero-element tensors is a no-op"
        if empty_at == "head":
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 0))
        else:
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 0), nn.ReLU(), nn.Linear(0, 4))
    x = torch.randn(64, 8)
    report = magicinit.init_(model, x, seed=0, between=False)
    assert report["2"].status == "excluded"
    assert any("no elements" in note for note in report["2"].notes)
    mean, std = channel_stats(model[0], first_call_outputs(model, x)["0"])  # the other layer: Part 1 done
    torch.testing.assert_close(std, torch.ones_like(std), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-4)
    magicinit.init_(model, x, seed=0)  # Part 2 too


def test_a_convolution_with_no_output_channels_that_torch_refuses_is_named_not_the_data() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = nn.Sequential(nn.Conv2d(3, 0, 3))
    saved = state_copy(model)
    with pytest.raises(MagicInitError, match=r"parameter '0.weight' has no elements") as error:
        magicinit.init_(model, torch.randn(8, 3, 8, 8), seed=0)
    assert "rejected the init data" not in str(error.value)
    assert_untouched(model, saved)
