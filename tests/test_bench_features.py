"""bench/features.py on fake CIFAR-shaped data: the feature extractor's layers and shapes, and a linear probe that
must learn a separable problem (the real CIFAR-10 is not needed)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import features
from features import Config, extract_features, fit_probe, probe_layer, select_data, standardize, tap_points
from magicinit.tools.nets import caffenet

pytestmark = pytest.mark.usefixtures("one_thread")


def small_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return caffenet(3, 10, width=0.125, small_images=True, hidden=8)


def test_tap_points_follow_relu_and_pool() -> None:
    net = small_net()
    taps = tap_points(net)
    assert list(taps) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    kinds = {name: type(net[at]).__name__ for name, at in taps.items()}
    assert kinds == {
        "conv1": "MaxPool2d",
        "conv2": "MaxPool2d",
        "conv3": "ReLU",
        "conv4": "ReLU",
        "conv5": "MaxPool2d",
    }
    # each tap's module directly follows its convolution (through its ReLU)
    convs = [i for i, m in enumerate(net) if isinstance(m, torch.nn.Conv2d)]
    assert all(0 < at - conv <= 2 for conv, at in zip(convs, taps.values()))


def test_extract_features_shapes_and_values() -> None:
    grid = 2
    net = small_net()
    images = torch.randn(7, 3, 32, 32)
    feats = extract_features(net, images, grid=grid, batch=3)
    channels = {"conv1": 12, "conv2": 32, "conv3": 48, "conv4": 48, "conv5": 32}
    assert {name: tuple(f.shape) for name, f in feats.items()} == {
        name: (7, c * grid * grid) for name, c in channels.items()
    }
    assert all(f.dtype == torch.float32 and (f >= 0).all() for f in feats.values())  # after ReLU
    # the same as running the modules by hand on the whole batch (batching and channels_last change nothing)
    with torch.no_grad():
        h = images
        for index, module in enumerate(net):
            h = module(h)
            if index == tap_points(net)["conv2"]:
                expected = torch.nn.functional.adaptive_avg_pool2d(h, grid).flatten(1)
                break
    torch.testing.assert_close(feats["conv2"], expected, rtol=1e-4, atol=1e-5)
    assert net.training  # the net's mode and layout are given back
    assert net[0].weight.is_contiguous()


def test_standardize_uses_training_statistics() -> None:
    train = torch.tensor([[0.0, 5.0], [2.0, 5.0]])
    other = torch.tensor([[1.0, 6.0]])
    s_train, s_other = standardize(train, other)
    torch.testing.assert_close(s_train.mean(0), torch.zeros(2))
    torch.testing.assert_close(s_other, torch.tensor([[0.0, 1.0]]))  # constant feature: divided by 1


def separable(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes around far-apart centres in 20 dimensions."""
    generator = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.eye(3, 20)
    labels = torch.arange(count) % 3
    return centres[labels] + torch.randn(count, 20, generator=generator), labels


def test_probe_learns_a_separable_problem() -> None:
    train, validation, test = separable(300, 0), separable(150, 1), separable(150, 2)
    result = probe_layer(train, validation, test, l2s=(1e-2, 1e-3), max_iter=30)
    assert result.features == 20
    assert result.test_accuracy > 0.9
    assert result.l2 in (1e-2, 1e-3)
    assert set(result.validation_by_l2) == {"0.01", "0.001"}


def test_probe_is_chance_on_shuffled_labels() -> None:
    x, y = separable(300, 0)
    probe = fit_probe(x, y[torch.randperm(300, generator=torch.Generator().manual_seed(0))], 3, 1e-2, 30)
    x_test, y_test = separable(300, 3)
    assert probe.accuracy(x_test, y_test) < 0.5


def test_select_data_keeps_init_images_apart() -> None:
    images = torch.arange(40.0).reshape(40, 1, 1, 1)
    labels = torch.arange(40) % 10
    dataset = SimpleNamespace(
        train=(images, labels), validation=(images[:8], labels[:8]), test=(images[:20], labels[:20])
    )
    config = Config(init_images=5, probe_train=30, validation=6, test=10)
    data = select_data(dataset, config)
    assert data.init_images.flatten().tolist() == [35.0, 36.0, 37.0, 38.0, 39.0]
    assert len(data.train[0]) == 30 and len(data.validation[0]) == 6 and len(data.test[0]) == 10
    assert len(set(data.test[0].flatten().tolist())) == 10
    with pytest.raises(SystemExit):
        select_data(dataset, Config(init_images=20, probe_train=30))


def test_random_init_is_seeded_with_zero_biases() -> None:
    images = torch.randn(16, 3, 32, 32)
    net = small_net()
    features.INITS["random"](net, images, 0)
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in net if isinstance(m, torch.nn.Conv2d))
    first = net[0].weight.detach().clone()
    features.INITS["random"](net, images, 0)
    torch.testing.assert_close(net[0].weight.detach(), first)  # seeded
