"""Networks for CIFAR-10 (3 x 32 x 32 inputs) that ``magicinit.tools.nets`` does not have, for
``bench/cifar_train.py``.

- ``caffenet_cifar``: the paper's CaffeNet layout (5 convolutions, conv2/4/5 in 2 groups, LRN after
  conv1 and conv2, 3 max-pools, 2 hidden linear layers with dropout) with its first convolution made
  5 x 5 stride 1 so that 32-pixel images keep spatial extent (``magicinit.tools.nets.caffenet`` needs at
  least 63 pixels), and narrow.
- ``resnet20``: the CIFAR ResNet-20 of He et al. (2016): a 3 x 3 stem of 16 channels, 3 stages of 3 basic
  blocks of 16 / 32 / 64 channels (stride 2 at the start of stages 2 and 3, a strided 1 x 1 projection
  shortcut where the shape changes), global average pooling and a linear head; with or without batch norm.
- ``vit``: a small vision transformer: 4 x 4 patches, a class token, learned position embeddings,
  pre-norm blocks (layer norm, multi-head self-attention, layer norm, GELU MLP), a layer-normed class
  token into a linear head.

Every builder returns a fresh module with torch's default initialization.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from magicinit.tools.nets import caffenet


def caffenet_cifar(
    width: float = 0.25, in_channels: int = 3, classes: int = 10, hidden: int = 512, lrn: bool = True
) -> nn.Sequential:
    """CaffeNet's layout for 32 x 32 inputs (``magicinit.tools.nets.caffenet(small_images=True)``): convolutions
    of 96 / 256 / 384 / 384 / 256 channels times ``width`` (conv1 5 x 5 stride 1), LRN after the first two
    pools, max-pools 3 / 2 (32 -> 16 -> 8 -> 4), linear layers of ``hidden`` units with dropout, the head."""
    return caffenet(in_channels, classes, width, lrn, small_images=True, hidden=hidden)


class BasicBlock(nn.Module):
    """``relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x))))))`` with 3 x 3 convolutions; the shortcut is the
    identity, or a strided 1 x 1 convolution (with batch norm) where the shape changes. Without
    ``batch_norm`` the norms are identities and the convolutions have biases."""

    def __init__(self, channels_in: int, channels: int, stride: int, batch_norm: bool) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

        bias = not batch_norm
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = norm()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.bn2 = norm()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels, 1, stride=stride, bias=bias), norm())

    def forward(self, x: Tensor) -> Tensor:
        """The block's output, ``(N, channels, H / stride, W / stride)``."""
        residual = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(self.shortcut(x) + residual)


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR: stem, 3 stages of ``blocks`` basic blocks of ``widths`` channels, global
    average pooling, linear head (``6 * blocks + 2`` layers deep on the longest path)."""

    def __init__(
        self,
        batch_norm: bool = False,
        widths: tuple[int, int, int] = (16, 32, 64),
        blocks: int = 3,
        in_channels: int = 3,
        classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=not batch_norm),
            nn.BatchNorm2d(widths[0]) if batch_norm else nn.Identity(),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        channels_in = widths[0]
        for stage, channels in enumerate(widths):
            stage_blocks = []
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                stage_blocks.append(BasicBlock(channels_in, channels, stride, batch_norm))
                channels_in = channels
            stages.append(nn.Sequential(*stage_blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, classes)`` of images ``(N, in_channels, H, W)``."""
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def resnet20(batch_norm: bool = False, widths: tuple[int, int, int] = (16, 32, 64), classes: int = 10) -> ResNet20:
    """ResNet-20 (3 stages x 3 basic blocks, ``widths`` channels), with batch norm or without."""
    return ResNet20(batch_norm, widths, 3, 3, classes)


class Attention(nn.Module):
    """Multi-head self-attention: one linear map to queries, keys and values, scaled dot-product attention
    per head, a linear output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, L, dim)`` -> ``(N, L, dim)``."""
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))`` (GELU)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = round(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        """``(N, L, dim)`` -> ``(N, L, dim)``."""
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small vision transformer: ``patch`` x ``patch`` patches embedded by a strided convolution, a class
    token, learned position embeddings, ``depth`` pre-norm blocks, a final layer norm and a linear head on
    the class token."""

    def __init__(
        self,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch: int = 4,
        mlp_ratio: float = 2.0,
        image_size: int = 32,
        in_channels: int = 3,
        classes: int = 10,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, (image_size // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, classes)`` of images ``(N, in_channels, image_size, image_size)``."""
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(len(x), -1, -1), tokens], dim=1) + self.position
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def vit(dim: int = 64, depth: int = 4, heads: int = 4, classes: int = 10) -> ViT:
    """A ViT for 32 x 32 images with 4 x 4 patches (65 tokens), ``depth`` blocks of width ``dim``."""
    return ViT(dim, depth, heads, classes=classes)
