"""The first-layer filters each sampler draws from CIFAR-10 patches, as one picture.

Protocol (all defaults; see ``--help``):

* Data, from ``--data-root`` (default ``../shared/data``): the first ``--per-class``
  (100) training images of each CIFAR-10 class (``train/<class>/0000.jpg`` on, from
  ``cifar10/cifar10-jpg.tar.gz`` as ``bench/cifar10.py`` decodes and caches it),
  32 x 32 RGB, scaled to [0, 1] and standardized per channel (mean 0, std 1 over
  these images).
* Layer: a 3 -> 64 convolution, 5 x 5, padding 2 (the first layer of a small
  CIFAR-style CNN; the paper's CaffeNet conv1 at 32 px would be this size), with a ReLU.
  The first layer's input is the data itself, so the rest of a network would not
  change what a sampler draws for it.
* Initialization: ``magicinit.init_(layer, images, sampler=NAME, between=False,
  seed=--seed, samples=all images)`` for each of gaussian, pca, zca, kmeans
  (the authors' construction) and kmeans-full: Part 1 draws the filters and
  normalizes every output channel (Part 2 has nothing to equalize in one layer).

Output: ``bench/filters_cifar10.png`` (one row per sampler, each filter min-max
normalized on its own, see ``magicinit.tools.plots.plot_filters``) and the section
``## bench/filters.py`` of ``bench/RESULTS.md``.

Run from the repository root::

    pip install -c constraints.txt -e ".[bench]"
    python bench/filters.py          # about 15 s on 2 CPU cores; 45 s the first time, while
                                     # bench/cifar10.py decodes and caches the archive
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import magicinit
from cifar10 import ARCHIVE, CLASSES, cifar10_arrays
from magicinit.tools.plots import plot_filters
from results_file import BENCH, commit, replace_section

DEFAULT_DATA_ROOT = BENCH.parent.parent / "shared" / "data"
SAMPLERS = ("gaussian", "pca", "zca", "kmeans", "kmeans-full")
HEADING = "## bench/filters.py"

# what each row of the picture shows, as seen on the run recorded in RESULTS.md
ROW_NOTES = {
    "gaussian": "i.i.d. noise: every filter a random colour speckle, no structure (the data is not looked at)",
    "pca": "the principal directions in order: first a smooth blob and the mean colour, then luminance edges and "
    "gradients (horizontal, vertical, diagonal) and colour-opponent ones (orange / blue, green / magenta), then "
    "higher and higher frequencies (checkerboards, stripes) down to speckle in the last row",
    "zca": "localized centre-surround filters: nearly every one a single bright pixel of one colour channel (red, "
    "green or blue) at its own position on a dark, faintly opposite-coloured surround; the last row's are more "
    "spread out and multicoloured",
    "kmeans": "the authors' construction: colour-saturated one-pixel bars and edges (horizontal and vertical "
    "stripes, red / green / magenta / blue on gray), some checkerboards and noisy mixtures; few are smooth, as the "
    "centroids are mapped back through the whitening, which boosts high frequencies",
    "kmeans-full": "on a more gray background, more varied: single dark or light pixels, colour bars and "
    "opposite-colour edge pairs (orange / blue), and a few smooth colour blobs and centre-surround spots",
}


def cifar10_training_images(data_root: Path, per_class: int) -> Tensor:
    """The first ``per_class`` training images of each class (by file name), ``(N, 3, 32, 32)`` float in [0, 1],
    class by class."""
    images, labels = cifar10_arrays(data_root / ARCHIVE).train  # ordered by label, then file name
    chosen = torch.cat([torch.nonzero(labels == label).flatten()[:per_class] for label in range(len(CLASSES))])
    return images[chosen].float() / 255


def standardized(images: Tensor) -> Tensor:
    """Every channel mean 0, std 1 over ``images``."""
    mean, std = images.mean(dim=(0, 2, 3), keepdim=True), images.std(dim=(0, 2, 3), keepdim=True)
    return (images - mean) / std


def first_layer() -> tuple[nn.Sequential, nn.Conv2d]:
    """A 3 -> 64, 5 x 5 convolution (padding 2) and its ReLU, and the convolution."""
    convolution = nn.Conv2d(3, 64, 5, padding=2)
    return nn.Sequential(convolution, nn.ReLU()), convolution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder with cifar10/ (default ../shared/data)"
    )
    parser.add_argument("--per-class", type=int, default=100, help="training images per class (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the layer's construction and of init_")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=BENCH / "filters_cifar10.png", help="the picture")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md", help="whose section is replaced")
    args = parser.parse_args()
    if not (args.data_root / ARCHIVE).is_file():
        parser.error(f"--data-root {args.data_root}: no {ARCHIVE} there (see ../shared/data/SOURCES.md)")
    torch.set_num_threads(args.threads)
    library_commit = commit()
    started = time.perf_counter()
    images = standardized(cifar10_training_images(args.data_root, args.per_class))
    print(f"{len(images)} CIFAR-10 training images read in {time.perf_counter() - started:.1f} s")
    filters: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    for sampler in SAMPLERS:
        torch.manual_seed(args.seed)
        layer, convolution = first_layer()
        begun = time.perf_counter()
        magicinit.init_(layer, images, sampler=sampler, between=False, seed=args.seed, samples=len(images))
        seconds[sampler] = time.perf_counter() - begun
        filters[sampler] = convolution.weight.detach().clone()
        print(f"  {sampler:<12} {seconds[sampler]:.2f} s")
    plot_filters(
        filters,
        args.out,
        title=f"First-layer filters (3 -> 64, 5x5) drawn from {len(images)} CIFAR-10 images, seed {args.seed}",
    )
    total = time.perf_counter() - started
    rows = "".join(f"| {name} | {seconds[name]:.2f} | {ROW_NOTES[name]} |\n" for name in SAMPLERS)
    section = (
        f"{HEADING}\n\nCommand, run from the repository root on {time.strftime('%Y-%m-%d')}, library at commit "
        f"{library_commit}, torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} "
        f"threads, CPU, {total:.0f} s in all:\n\n"
        f'```\npip install -c constraints.txt -e ".[bench]"\npython bench/filters.py\n```\n\n'
        f"The filters of a 3 -> 64, 5 x 5 convolution (padding 2) that each sampler draws from the patches of "
        f"{len(images)} CIFAR-10 training images (the first {args.per_class} of each class, standardized per "
        f"channel), `magicinit.init_(layer, images, sampler=..., between=False, seed={args.seed})`; one row per "
        "sampler, each filter min-max normalized to [0, 1] on its own (`magicinit.tools.plots.plot_filters`).\n\n"
        "| sampler | init s | the filters |\n|---|---:|---|\n" + rows + f"\n![filters]({args.out.name})\n\n"
    )
    replace_section(args.results, HEADING, section)
    print(f"wrote {args.out} and the section {HEADING!r} of {args.results}")


if __name__ == "__main__":
    main()
