"""CIFAR-10 for the benchmarks, read straight from ``cifar10/cifar10-jpg.tar.gz`` under the data root.

The archive (see ``../shared/data/SOURCES.md``) is a JPEG copy of CIFAR-10: ``./train/<class>/NNNN.jpg``
(50 000 images, 5 000 per class) and ``./test/<class>/NNNN.jpg`` (10 000, 1 000 per class), 32 x 32 RGB; the
class folders in ``CLASSES``' order are the labels 0..9. ``magicinit.tools.readers.iter_tar_images`` reads it
with ``tarfile`` (nothing is unpacked) and ``decode_image`` decodes each JPEG with Pillow. Decoding all 60 000
takes about 35 s on one core, so the decoded arrays are cached in an ``.npz`` named by the archive's md5
under ``cache_dir`` (default ``$XDG_CACHE_HOME/magicinit-bench``, else ``~/.cache/magicinit-bench``); a later
load takes a fraction of a second.

``load_cifar10`` gives ``bench/train.py``'s ``Dataset``: 45 000 training images, 5 000 held out for
validation, the 10 000 test images, ``(N, 3, 32, 32)``. Run as a script, this module decodes (or loads) the
archive and prints the timings, the images per class and the per-channel mean and std::

    python bench/cifar10.py [--data-root ../shared/data] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from magicinit.tools.readers import decode_image, iter_tar_images

if TYPE_CHECKING:
    from train import Dataset

ARCHIVE = Path("cifar10") / "cifar10-jpg.tar.gz"  # under the data root
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
IMAGE_SHAPE = (3, 32, 32)
CACHE_FORMAT = 1  # part of the cache file's name: raise it when the decoded arrays change
VALIDATION_SHARE = 10  # one training image in this many is held out for validation


@dataclass(frozen=True)
class Cifar10Arrays:
    """The archive decoded: for each split, uint8 images ``(N, 3, 32, 32)`` and int64 labels 0..9, ordered by
    label, then file name."""

    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def default_cache_dir() -> Path:
    """Where decoded arrays are cached by default: ``$XDG_CACHE_HOME/magicinit-bench`` or
    ``~/.cache/magicinit-bench``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "magicinit-bench"


def _split_and_label(archive: Path, name: str) -> tuple[str, int]:
    """The split and the label a member's path ``<split>/<class>/<file>`` gives."""
    parts = PurePosixPath(name).parts
    if len(parts) != 3 or parts[0] not in SPLITS or parts[1] not in CLASSES:
        raise SystemExit(
            f"{archive}: {name!r} is not <split>/<class>/<file> with split {' or '.join(SPLITS)} and a CIFAR-10 class"
        )
    return parts[0], CLASSES.index(parts[1])


def decode_cifar10(archive: Path) -> Cifar10Arrays:
    """Every image of the archive decoded (no cache), its split and label from its path."""
    found: dict[str, list[tuple[int, str, Tensor]]] = {split: [] for split in SPLITS}
    for name, data in iter_tar_images(archive):
        split, label = _split_and_label(archive, name)
        image = decode_image(data, name, channels=3)
        if tuple(image.shape) != IMAGE_SHAPE:
            raise SystemExit(f"{archive}: {name!r} is {tuple(image.shape)}, not {IMAGE_SHAPE}")
        found[split].append((label, name, image))

    def arrays(split: str) -> tuple[Tensor, Tensor]:
        entries = sorted(found[split], key=lambda entry: entry[:2])
        if not entries:
            raise SystemExit(f"{archive}: no images under {split}/")
        images = torch.stack([image for _, _, image in entries])
        return images, torch.tensor([label for label, _, _ in entries], dtype=torch.long)

    return Cifar10Arrays(arrays("train"), arrays("test"))


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def cache_file(archive: Path, cache_dir: Path | None = None) -> Path:
    """The cache of ``archive``'s decoded arrays: named by its md5 (a changed archive is decoded again)."""
    return (cache_dir or default_cache_dir()) / f"cifar10-{_md5(archive)}-format{CACHE_FORMAT}.npz"


def _read_cache(path: Path) -> Cifar10Arrays | None:
    """The arrays a cache file holds; None where it is missing or damaged."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return Cifar10Arrays(
                *(
                    (torch.from_numpy(stored[f"{split}_images"]), torch.from_numpy(stored[f"{split}_labels"]))
                    for split in SPLITS
                )
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _write_cache(path: Path, arrays: Cifar10Arrays) -> None:
    """Write the cache file whole or not at all (a temporary file beside it, renamed)."""
    named = {
        f"{split}_{kind}": tensor.numpy()
        for split, (images, labels) in zip(SPLITS, (arrays.train, arrays.test))
        for kind, tensor in (("images", images), ("labels", labels))
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    except OSError as error:
        print(f"CIFAR-10: not cached ({error})", file=sys.stderr)
        return
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **named)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def cifar10_arrays(archive: Path, cache_dir: Path | None = None) -> Cifar10Arrays:
    """``decode_cifar10(archive)``, loaded from the cache under ``cache_dir`` where it holds this archive's
    arrays; otherwise decoded and then cached."""
    cache = cache_file(archive, cache_dir)
    cached = _read_cache(cache) if cache.is_file() else None
    if cached is not None:
        return cached
    arrays = decode_cifar10(archive)
    _write_cache(cache, arrays)
    return arrays


def load_cifar10(root: Path, cache_dir: Path | None = None) -> Dataset:
    """CIFAR-10 from ``root/cifar10/cifar10-jpg.tar.gz``: 45 000 training images, 5 000 validation, the
    10 000 test images, ``(N, 3, 32, 32)``, standardized as ``bench/train.py`` standardizes every dataset."""
    from train import _split  # here, not at the top: train.py imports this module for its DATASETS

    archive = root / ARCHIVE
    if not archive.is_file():
        raise SystemExit(f"CIFAR-10: no {archive} (see ../shared/data/SOURCES.md)")
    arrays = cifar10_arrays(archive, cache_dir)
    images, labels = arrays.train
    test_images, test_labels = arrays.test
    validation_count = len(images) // VALIDATION_SHARE
    return _split(
        "CIFAR10",
        images.float() / 255.0,
        labels,
        (test_images.float() / 255.0, test_labels),
        len(images) - validation_count,
        validation_count,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="default ~/.cache/magicinit-bench")
    args = parser.parse_args()
    archive = args.data_root / ARCHIVE
    cache = cache_file(archive, args.cache_dir)
    print(f"archive {archive}, cache {cache} ({'present' if cache.is_file() else 'absent'})")
    for attempt in ("first", "second"):
        start = time.perf_counter()
        arrays = cifar10_arrays(archive, args.cache_dir)
        print(f"{attempt} load: {time.perf_counter() - start:.2f} s (torch threads {torch.get_num_threads()})")
    for split, (images, labels) in zip(SPLITS, (arrays.train, arrays.test)):
        counts = torch.bincount(labels, minlength=len(CLASSES)).tolist()
        pixels = images.double() / 255.0
        mean = pixels.mean(dim=(0, 2, 3)).tolist()
        std = pixels.std(dim=(0, 2, 3)).tolist()
        print(f"{split}: {tuple(images.shape)} {images.dtype}; per class {dict(zip(CLASSES, counts))}")
        print(f"  mean {' / '.join(f'{m:.4f}' for m in mean)}, std {' / '.join(f'{s:.4f}' for s in std)}")


if __name__ == "__main__":
    main()
