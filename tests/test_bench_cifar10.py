"""bench/cifar10.py on a tiny archive of CIFAR-10's layout made here (the real one is not needed)."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import cifar10
from cifar10 import ARCHIVE, CLASSES, cifar10_arrays, decode_cifar10, load_cifar10

PER_CLASS = {"train": 3, "test": 1}


def colour(split: str, label: int, index: int, shift: int = 0) -> tuple[int, int, int]:
    """The flat colour of an image of the tiny archive: it tells the image's split, class and number."""
    return 20 * label + shift, 60 * index + 10, 40 if split == "train" else 200


def write_archive(path: Path, shift: int = 0) -> None:
    """``./<split>/<class>/NNNN.jpg`` flat-colour JPEGs (test first, classes backwards, as an archive may hold
    them), the folders as members, and a README that is not an image."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes | None) -> None:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        add(".", None)
        add("./README.md", b"CIFAR-10, tiny\n")
        for split in ("test", "train"):
            add(f"./{split}", None)
            for label in reversed(range(len(CLASSES))):
                add(f"./{split}/{CLASSES[label]}", None)
                for index in reversed(range(PER_CLASS[split])):
                    buffer = io.BytesIO()
                    Image.new("RGB", (32, 32), colour(split, label, index, shift)).save(buffer, "JPEG", quality=95)
                    add(f"./{split}/{CLASSES[label]}/{index:04d}.jpg", buffer.getvalue())


def expected_colours(split: str, shift: int = 0) -> torch.Tensor:
    """The colour of each image of ``split`` in the loader's order (by label, then file name)."""
    return torch.tensor(
        [colour(split, label, index, shift) for label in range(len(CLASSES)) for index in range(PER_CLASS[split])],
        dtype=torch.float32,
    )


def test_the_archive_decodes_to_uint8_images_labelled_by_their_class_folder(tmp_path: Path) -> None:
    archive = tmp_path / ARCHIVE
    write_archive(archive)
    arrays = decode_cifar10(archive)
    for split, (images, labels) in (("train", arrays.train), ("test", arrays.test)):
        count = PER_CLASS[split] * len(CLASSES)
        assert images.shape == (count, 3, 32, 32) and images.dtype == torch.uint8
        assert labels.dtype == torch.long
        assert labels.tolist() == [label for label in range(len(CLASSES)) for _ in range(PER_CLASS[split])]
        mean_colours = images.float().mean(dim=(2, 3))
        assert torch.allclose(mean_colours, expected_colours(split), atol=3)  # JPEG of a flat colour: close


def test_the_decoded_arrays_are_cached_by_the_archives_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, cache_dir = tmp_path / ARCHIVE, tmp_path / "cache"
    write_archive(archive)
    decoded = cifar10_arrays(archive, cache_dir)
    assert len(list(cache_dir.glob("*.npz"))) == 1

    def refuse(path: Path) -> None:
        raise AssertionError("decoded again although cached")

    with monkeypatch.context() as patch:
        patch.setattr(cifar10, "decode_cifar10", refuse)
        cached = cifar10_arrays(archive, cache_dir)
    for (images, labels), (cached_images, cached_labels) in zip(
        (decoded.train, decoded.test), (cached.train, cached.test)
    ):
        assert torch.equal(images, cached_images) and torch.equal(labels, cached_labels)

    write_archive(archive, shift=5)  # another archive at the same path: decoded, not taken from the cache
    changed = cifar10_arrays(archive, cache_dir)
    assert torch.allclose(changed.train[0].float().mean(dim=(2, 3)), expected_colours("train", shift=5), atol=3)
    assert len(list(cache_dir.glob("*.npz"))) == 2

    for damaged in cache_dir.glob("*.npz"):  # a damaged cache file is decoded again
        damaged.write_bytes(b"cut short")
    assert torch.equal(cifar10_arrays(archive, cache_dir).train[0], changed.train[0])


def test_load_cifar10_gives_trains_dataset(tmp_path: Path) -> None:
    write_archive(tmp_path / ARCHIVE)
    data = load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    assert data.name == "CIFAR10"
    train_count = PER_CLASS["train"] * len(CLASSES)
    validation_count = train_count // cifar10.VALIDATION_SHARE
    assert data.train[0].shape == (train_count - validation_count, 3, 32, 32)
    assert data.validation[0].shape == (validation_count, 3, 32, 32)
    assert data.test[0].shape == (PER_CLASS["test"] * len(CLASSES), 3, 32, 32)
    assert data.train[0].dtype == torch.float32
    assert abs(float(data.train[0].mean())) < 1e-4 and abs(float(data.train[0].std()) - 1) < 1e-3
    train_and_validation = torch.cat([data.train[1], data.validation[1]]).sort().values
    assert train_and_validation.tolist() == [label for label in range(10) for _ in range(PER_CLASS["train"])]
    assert data.test[1].tolist() == list(range(10))


def test_a_member_outside_the_layout_is_named(tmp_path: Path) -> None:
    from PIL import Image

    archive = tmp_path / "odd.tar"
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    with tarfile.open(archive, "w") as tar:
        tar.add(image, arcname="./train/cat/0000.png")
        tar.add(image, arcname="./valid/cat/0000.png")
    with pytest.raises(SystemExit, match=r"'valid/cat/0000\.png' is not <split>/<class>/<file>"):
        decode_cifar10(archive)
