"""The main job on built-in defaults: initialize a deep plain CNN and show what changed.

Run with ``python -m magicinit`` (or ``magicinit-demo``). Offline, no dataset
needed: the init data are generated smooth random images.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from .diagnose import diagnose
from .initialize import init_
from .report import Diagnosis

__all__ = ["plain_cnn", "smooth_images", "main"]


def plain_cnn(depth: int = 16, width: int = 32, classes: int = 10) -> nn.Sequential:
    """A plain ReLU CNN without batch norm: ``depth`` affine layers (3x3 convs, a linear head)."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for i in range(depth - 2):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        if i in ((depth - 2) // 3, 2 * (depth - 2) // 3):
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]
    return nn.Sequential(*layers)


def smooth_images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images with natural-image-like spatial correlation: blurred, rescaled Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, 3, size, size, generator=generator)
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 256).expand(3, 1, 5, 5)
    for _ in range(3):
        noise = nn.functional.conv2d(noise, kernel, padding=2, groups=3)
    return (noise - noise.mean()) / noise.std()


def _summary(diagnosis: Diagnosis) -> str:
    rates = [d.rate for d in diagnosis.layers if d.rate > 0]
    worst_cv = max(d.output_cv for d in diagnosis.layers)
    return f"max channel-std CV {worst_cv:.3g}, change-rate spread (max/min) {max(rates) / min(rates):.3g}"


def main(argv: list[str] | None = None) -> None:
    """Initialize ``plain_cnn(depth)`` on generated images and print the report."""
    parser = argparse.ArgumentParser(prog="python -m magicinit", description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16, help="affine layers in the plain CNN (default 16)")
    parser.add_argument("--samples", type=int, default=256, help="init images (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = plain_cnn(args.depth)
    images = smooth_images(args.samples, seed=args.seed)
    print(f"A plain {args.depth}-layer ReLU CNN without batch norm, {args.samples} generated 3x32x32 images.")
    print("With torch's default initialization:", _summary(diagnose(model, images)))
    with torch.no_grad():
        before = model(images).std().item()
    report = init_(model, images, seed=args.seed, progress=args.progress)
    print()
    print(report)
    print()
    with torch.no_grad():
        after = model(images).std().item()
    print("After magicinit.init_:", _summary(diagnose(model, images)))
    print(f"Output std on the init images: {before:.3g} before, {after:.3g} after.")


if __name__ == "__main__":
    main()
