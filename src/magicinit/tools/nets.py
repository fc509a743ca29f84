"""Built-in networks of the paper's kind: deep nets without batch normalization.

Every builder takes ``in_channels`` and ``classes`` and returns a fresh module
with torch's default initialization. ``ZOO`` maps the names the command line
accepts to builders; ``build_model(name, **kwargs)`` builds one.

- ``plain-cnn``: 3x3 ReLU convolutions, two max-pools, global average pool, a
  linear head; ``depth`` affine layers in all (``batch_norm=True`` adds batch
  norm after every convolution: the yardstick of ``bench/train.py``).
- ``caffenet``: the AlexNet/CaffeNet layout of the paper (grouped convolutions,
  local response normalization, dropout), for inputs of at least 63 pixels.
- ``vgg``: plain VGG-style nets of a given ``depth`` (convolutions + 3 linear
  layers); ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19`` are the usual depths.
- ``resnet-nobn``: a ResNet with basic blocks and no batch norm (depth 10, 18,
  34); ``resnet18-nobn``, ``resnet34-nobn`` for short.

Pooling uses ``ceil_mode=True``, so small inputs (8x8 digits) pass through
deep nets without shrinking to nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import MagicInitError

__all__ = ["TORCHVISION_CLASSIFIERS", "ZOO", "build_model", "caffenet", "plain_cnn", "resnet_nobn", "vgg"]


def _channels(base: int, width: float) -> int:
    return max(1, round(base * width))


def plain_cnn(
    depth: int = 16,
    width: int = 32,
    in_channels: int = 3,
    classes: int = 10,
    batch_norm: bool = False,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """A plain CNN: ``depth - 1`` 3x3 convolutions of ``width`` channels, each followed by
    ``activation()`` (ReLU by default; batch norm before it if ``batch_norm``), with two
    max-pools at one and two thirds, global average pooling and a linear head."""
    if depth < 2:
        raise MagicInitError(f"plain-cnn: depth={depth}; needs at least 2 (one convolution and the head)")

    def conv(channels_in: int) -> list[nn.Module]:
        block: list[nn.Module] = [nn.Conv2d(channels_in, width, 3, padding=1)]
        if batch_norm:
            block.append(nn.BatchNorm2d(width))
        return [*block, activation()]

    layers = conv(in_channels)
    pool_after = {(depth - 2) // 3, 2 * (depth - 2) // 3}
    for i in range(depth - 2):
        layers += conv(width)
        if i in pool_after:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]
    return nn.Sequential(*layers)


def caffenet(
    in_channels: int = 3,
    classes: int = 1000,
    width: float = 1.0,
    lrn: bool = True,
    *,
    small_images: bool = False,
    hidden: int | None = None,
) -> nn.Sequential:
    """The CaffeNet (AlexNet) layout: 5 convolutions (conv2, 4, 5 in 2 groups), LRN after
    conv1 and conv2, 3 max-pools, 2 dropout-regularized hidden linear layers of 4096.

    ``width`` scales every convolution's channels (and the hidden layers, unless ``hidden`` gives
    their units). ``small_images``: the layout for 32 x 32 inputs (CIFAR-10), which the ImageNet stem
    (conv1 11 x 11 stride 4, at least 63 pixels) cannot take: conv1 5 x 5 stride 1 and padded pools
    (32 -> 16 -> 8 -> 4 pixels), the features flattened at 4 x 4.
    """
    c1, c2, c3 = (_channels(n, width) for n in (96, 256, 384))
    c1, c2, c3 = (2 * max(1, c // 2) for c in (c1, c2, c3))  # grouped convolutions need even widths
    hidden = _channels(4096, width) if hidden is None else hidden

    def norm() -> list[nn.Module]:
        return [nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)] if lrn else []

    def pool() -> nn.MaxPool2d:
        return nn.MaxPool2d(3, 2, padding=1) if small_images else nn.MaxPool2d(3, 2, ceil_mode=True)

    stem = nn.Conv2d(in_channels, c1, 5, padding=2) if small_images else nn.Conv2d(in_channels, c1, 11, 4, 2)
    features = 4 if small_images else 6
    return nn.Sequential(
        stem,
        nn.ReLU(),
        pool(),
        *norm(),
        nn.Conv2d(c1, c2, 5, padding=2, groups=2),
        nn.ReLU(),
        pool(),
        *norm(),
        nn.Conv2d(c2, c3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c3, c3, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(c3, c2, 3, padding=1, groups=2),
        nn.ReLU(),
        pool(),
        nn.AdaptiveAvgPool2d(features),
        nn.Flatten(),
        nn.Linear(c2 * features * features, hidden),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(hidden, classes),
    )


VGG_STAGES = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


def _vgg_stages(depth: int) -> tuple[int, ...]:
    """Convolutions per stage: VGG's own at 11/13/16/19, else ``depth - 3`` spread evenly, later stages first."""
    if depth in VGG_STAGES:
        return VGG_STAGES[depth]
    if depth < 8:
        raise MagicInitError(f"vgg: depth={depth}; needs at least 8 (5 convolution stages and 3 linear layers)")
    convs = depth - 3
    return tuple(convs // 5 + (stage >= 5 - convs % 5) for stage in range(5))


def vgg(depth: int = 16, in_channels: int = 3, classes: int = 1000, width: float = 1.0) -> nn.Sequential:
    """A plain VGG-style net: ``depth - 3`` 3x3 ReLU convolutions in 5 stages of 64..512
    channels (times ``width``), each stage ending in a max-pool, then global average
    pooling and 3 linear layers (hidden 4096 x ``width``, with dropout)."""
    layers: list[nn.Module] = []
    channels_in = in_channels
    for stage, count in enumerate(_vgg_stages(depth)):
        channels = _channels(min(64 * 2**stage, 512), width)
        for _ in range(count):
            layers += [nn.Conv2d(channels_in, channels, 3, padding=1), nn.ReLU()]
            channels_in = channels
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    hidden = _channels(4096, width)
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels_in, hidden),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(hidden, classes),
    ]
    return nn.Sequential(*layers)


class BasicBlockNoBN(nn.Module):
    """Two 3x3 convolutions with a ReLU between, added to the input (a strided 1x1
    projection where the shape changes), then a ReLU. No batch norm."""

    def __init__(self, channels_in: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.shortcut = (
            nn.Conv2d(channels_in, channels, 1, stride=stride) if stride != 1 or channels_in != channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        """``relu(shortcut(x) + conv2(relu(conv1(x))))``."""
        identity = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(identity + self.conv2(torch.relu(self.conv1(x))))


class ResNetNoBN(nn.Module):
    """ResNet with basic blocks and no batch norm (torchvision's layout otherwise)."""

    BLOCKS: ClassVar[dict[int, tuple[int, ...]]] = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

    def __init__(self, depth: int = 18, in_channels: int = 3, classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        if depth not in self.BLOCKS:
            raise MagicInitError(f"resnet-nobn: depth={depth} is not one of {sorted(self.BLOCKS)}")
        channels = _channels(64, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 7, stride=2, padding=3),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        )
        stages = []
        channels_in = channels
        for stage, count in enumerate(self.BLOCKS[depth]):
            channels = _channels(64 * 2**stage, width)
            blocks = []
            for i in range(count):
                blocks.append(BasicBlockNoBN(channels_in, channels, 2 if stage and not i else 1))
                channels_in = channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, classes)`` of images ``(N, in_channels, H, W)``."""
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def resnet_nobn(depth: int = 18, in_channels: int = 3, classes: int = 1000, width: float = 1.0) -> ResNetNoBN:
    """A ResNet-``depth`` (10, 18 or 34) with basic blocks and no batch norm."""
    return ResNetNoBN(depth, in_channels, classes, width)


# torchvision classifiers that tests/test_zoo.py initializes and bench/zoo.py tabulates (README).
TORCHVISION_CLASSIFIERS = (
    "alexnet",
    "vgg11",
    "resnet18",
    "googlenet",
    "densenet121",
    "mobilenet_v3_small",
    "squeezenet1_1",
    "shufflenet_v2_x0_5",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_x_400mf",
)

ZOO: dict[str, Callable[..., nn.Module]] = {
    "plain-cnn": plain_cnn,
    "caffenet": caffenet,
    "vgg": vgg,
    **{f"vgg{depth}": partial(vgg, depth) for depth in VGG_STAGES},
    "resnet-nobn": resnet_nobn,
    **{f"resnet{depth}-nobn": partial(resnet_nobn, depth) for depth in ResNetNoBN.BLOCKS},
}


def build_model(name: str, **kwargs: object) -> nn.Module:
    """The zoo network ``name`` built with ``kwargs``; a clear error for unknown names or arguments."""
    try:
        builder = ZOO[name]
    except KeyError:
        raise MagicInitError(f"model {name!r} is not in the zoo; choose one of: {', '.join(ZOO)}") from None
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as error:  # an unknown or impossible argument
        raise MagicInitError(f"model {name!r}: {error}") from None
