"""Init data from files and built-in sets, for the command line.

``load_images(source, ...)`` reads, as one float32 tensor ``(N, C, H, W)``
(or ``(N, features)`` / ``(N, C, L)`` for arrays of that shape):

- a folder of images (searched recursively; Pillow reads them), each resized
  so its shorter side is ``input_size`` and centre-cropped to a square;
- a tar archive of images (``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``,
  ``.tar.xz``), read as that folder would be once unpacked, without unpacking
  anything to disk (its regular-file members; links are not followed);
- a ``.npy``/``.npz`` array (numpy), a ``.pt``/``.pth`` tensor (``torch.load``
  with ``weights_only=True``; from a dict, tuple or list the entry ``key`` or
  the first tensor);
- an idx file in MNIST's format (``*-idx3-ubyte``, optionally ``.gz``);
- a built-in name from ``BUILT_IN``: ``digits`` (scikit-learn's 8x8 digits,
  which the package ships) or ``smooth`` (generated, spatially correlated noise).

uint8 data are divided by 255 and uint16 by 65535; other integer types are
taken as they are. A 3-d array is ``(N, H, W)`` images and gets a channel
axis when it comes from an idx file or ``H == W`` (else it is ``(N, C, L)``);
a channels-last 4-d array (last axis 1, 3 or 4 and the second not) is made
channels-first. Images read from a folder or an archive have 8 bits per channel (16-bit
grayscale is scaled down, not clipped). ``standardize`` makes every
channel mean 0 and std 1 over the loaded samples. At most ``samples`` samples
are used, a random subset drawn with ``seed`` where there are more.
"""

from __future__ import annotations

import gzip
import io
import logging
import struct
import tarfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath, PurePosixPath
from typing import IO, TypeVar

import torch
from torch import Tensor, nn

from .. import MagicInitError

__all__ = [
    "BUILT_IN",
    "IMAGE_SUFFIXES",
    "TAR_SUFFIXES",
    "data_path",
    "decode_image",
    "digits",
    "image_files",
    "is_image_file_name",
    "is_tar_file_name",
    "iter_tar_images",
    "load_images",
    "read_idx",
    "resize_images",
    "smooth_images",
    "tar_image_names",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
_Image = TypeVar("_Image", Path, str)  # an image of a folder (its path) or of an archive (its member's name)
IDX_TYPES = {
    0x08: torch.uint8,
    0x09: torch.int8,
    0x0B: torch.int16,
    0x0C: torch.int32,
    0x0D: torch.float32,
    0x0E: torch.float64,
}


def smooth_images(count: int, size: int = 32, seed: int = 0, channels: int = 3) -> Tensor:
    """Images with natural-image-like spatial correlation: blurred, rescaled Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, channels, size, size, generator=generator)
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 256).expand(channels, 1, 5, 5)
    for _ in range(3):
        noise = nn.functional.conv2d(noise, kernel, padding=2, groups=channels)
    return (noise - noise.mean()) / noise.std()


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's handwritten digits: images ``(1797, 1, 8, 8)`` in [0, 1] and labels ``(1797,)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MagicInitError(
            "data 'digits' needs scikit-learn, which ships it: pip install 'magicinit[demo]'"
        ) from None
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


# name -> (samples, seed, channels) -> images
BUILT_IN: dict[str, Callable[[int, int, int], Tensor]] = {
    "digits": lambda samples, seed, channels: digits()[0],
    "smooth": lambda samples, seed, channels: smooth_images(samples, seed=seed, channels=channels),
}


def read_idx(path: Path) -> Tensor:
    """An idx file (MNIST's format: magic ``0 0 type ndim``, big-endian sizes, then the data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            raw = file.read()
    except (OSError, EOFError) as error:
        raise MagicInitError(f"data file {str(path)!r} cannot be read: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise MagicInitError(f"data file {str(path)!r} is not an idx file (bad magic number)")
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise MagicInitError(f"data file {str(path)!r}: the idx header is cut short")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = bytearray(raw[4 + 4 * ndim :])
    count = 1
    for size in shape:
        count *= size
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(body) != count * itemsize:
        raise MagicInitError(
            f"data file {str(path)!r}: the header says {shape} ({count * itemsize} bytes), the file holds {len(body)}"
        )
    values = torch.frombuffer(body, dtype=dtype) if count else torch.empty(0, dtype=dtype)
    if itemsize > 1:  # idx is big-endian
        values = values.view(torch.uint8).view(-1, itemsize).flip(1).contiguous().view(dtype).flatten()
    return values.reshape(shape)


def _read_numpy(path: Path, key: str | None) -> Tensor:
    try:
        import numpy as np
    except ImportError:
        raise MagicInitError(f"data file {str(path)!r}: reading .npy/.npz needs numpy (pip install numpy)") from None
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise MagicInitError(f"data file {str(path)!r} cannot be read: {error}") from None
    if path.suffix == ".npz":
        names = list(loaded.files)
        if not names:
            raise MagicInitError(f"data file {str(path)!r} holds no arrays")
        name = key if key is not None else names[0]
        if name not in names:
            raise MagicInitError(f"data file {str(path)!r} has no array {name!r}; it has: {', '.join(names)}")
        loaded = loaded[name]
    if loaded.dtype.byteorder not in ("=", "|"):
        loaded = loaded.astype(loaded.dtype.newbyteorder("="))  # big-endian files
    return torch.from_numpy(loaded.copy())


def _read_torch(path: Path, key: str | None) -> Tensor:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a bad file
        raise MagicInitError(f"data file {str(path)!r} cannot be read by torch.load: {error}") from None
    if isinstance(loaded, Tensor):
        return loaded
    if isinstance(loaded, dict):
        if key is not None:
            if key not in loaded:
                raise MagicInitError(
                    f"data file {str(path)!r} has no entry {key!r}; it has: {', '.join(map(str, loaded))}"
                )
            loaded = loaded[key]
        else:
            loaded = next((v for v in loaded.values() if isinstance(v, Tensor)), None)
    elif isinstance(loaded, (tuple, list)):
        if key is not None:
            if not key.isdigit() or int(key) >= len(loaded):
                raise MagicInitError(
                    f"data file {str(path)!r} holds a sequence of {len(loaded)}; "
                    f"the key must be an index below that, not {key!r}"
                )
            loaded = loaded[int(key)]
        else:
            loaded = next((v for v in loaded if isinstance(v, Tensor)), None)
    if not isinstance(loaded, Tensor):
        raise MagicInitError(f"data file {str(path)!r} holds no tensor (pass --data-key to choose an entry)")
    return loaded


def _image_pixels(file: Path | IO[bytes], where: str, channels: int, size: int | None) -> Tensor:
    """The image in ``file`` (named ``where`` in errors) as uint8 ``(channels, H, W)``: 16-bit grayscale scaled
    to 8 bits; with ``size``, resized so its shorter side is ``size`` and centre-cropped to ``size x size``."""
    try:
        from PIL import Image
    except ImportError:
        raise MagicInitError("reading images needs Pillow: pip install 'magicinit[cli]'") from None
    try:
        with Image.open(file) as opened:
            image: Image.Image = opened  # converted below into other images
            if image.mode.startswith("I;16"):
                image = image.convert("I")
            if image.mode == "I":  # 16-bit grayscale: scale to 8 bits rather than clip
                image = image.point(lambda value: value * (1 / 256))
            image = image.convert("L" if channels == 1 else "RGB")
            if size is not None:
                scale = size / min(image.size)
                width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
                image = image.resize((width, height), Image.Resampling.BILINEAR)
                left, top = (width - size) // 2, (height - size) // 2
                image = image.crop((left, top, left + size, top + size))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            height, width = image.height, image.width
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise MagicInitError(f"image {where} cannot be read: {error}") from None
    return pixels.reshape(height, width, -1).permute(2, 0, 1)


def _read_image(file: Path | IO[bytes], where: str, size: int, channels: int) -> Tensor:
    return _image_pixels(file, where, channels, size).float() / 255.0


def decode_image(data: bytes, name: str, channels: int = 3) -> Tensor:
    """An image file's bytes (any format Pillow reads), decoded at its own size as uint8 ``(channels, H, W)``
    by the rules of ``load_images``' images (16-bit grayscale scaled to 8 bits); ``name`` is its name in errors.

    Raises:
        MagicInitError: naming ``name``, where Pillow cannot decode the bytes (or is not installed).
    """
    return _image_pixels(io.BytesIO(data), repr(name), channels, size=None)


def _subset(count: int, samples: int, seed: int) -> Tensor | None:
    if count <= samples:
        return None
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:samples].sort().values


def is_image_file_name(path: PurePath) -> bool:
    """Whether a folder of images given as data would read ``path`` as one of its images (by its suffix)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: Path) -> list[Path]:
    """The images a folder given as data holds: its files (searched recursively) with an image suffix, sorted."""
    return sorted(path for path in folder.rglob("*") if is_image_file_name(path) and path.is_file())


def _chosen_images(images: list[_Image], origin: str, samples: int, seed: int) -> list[_Image]:
    """Of the images a folder or an archive holds (sorted), those read: all, or a seeded random ``samples`` of
    them; none is an error naming ``origin``."""
    if not images:
        raise MagicInitError(f"{origin} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    chosen = _subset(len(images), samples, seed)
    return images if chosen is None else [images[i] for i in chosen.tolist()]


def _read_folder(folder: Path, samples: int, seed: int, input_size: int, channels: int) -> Tensor:
    files = _chosen_images(image_files(folder), f"data folder {str(folder)!r}", samples, seed)
    return torch.stack([_read_image(path, repr(str(path)), input_size, channels) for path in files])


def is_tar_file_name(path: PurePath) -> bool:
    """Whether ``load_images`` reads ``path`` as a tar archive of images: its name ends with one of
    ``TAR_SUFFIXES`` (any case)."""
    return path.name.lower().endswith(TAR_SUFFIXES)


@contextmanager
def _tar_errors(archive: Path) -> Iterator[None]:
    """Any failure to read ``archive`` (truncated, not a tar, bad compression) as an error naming it."""
    try:
        yield
    except MagicInitError:
        raise
    except Exception as error:  # tarfile and each decompressor have their own exception types
        raise MagicInitError(
            f"data archive {str(archive)!r} cannot be read as a tar archive: {type(error).__name__}: {error}"
        ) from None


def _is_image_member(member: tarfile.TarInfo) -> bool:
    return member.isfile() and is_image_file_name(PurePosixPath(member.name))


def _member_name(member: tarfile.TarInfo) -> str:
    """A member's path as the folder it unpacks to would have it: ``./a/b.png`` is ``a/b.png``."""
    return PurePosixPath(member.name).as_posix()


def tar_image_names(archive: Path) -> list[str]:
    """The images a tar archive given as data holds: its regular-file members with an image suffix, by their
    paths (without a leading ``./``), sorted as a folder's images are sorted.

    Raises:
        MagicInitError: naming the archive, where it cannot be read.
    """
    with _tar_errors(archive), tarfile.open(archive) as tar:
        names = {_member_name(member) for member in tar if _is_image_member(member)}
    return sorted(names, key=PurePosixPath)


def iter_tar_images(archive: Path, names: Collection[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """Each image of a tar archive (a name of ``tar_image_names``) with its file's bytes, in the archive's
    order, read in one pass (compressed or not) without unpacking anything to disk; only the images in
    ``names`` where given. A name stored twice comes twice; the later copy is the one unpacking would leave.

    Raises:
        MagicInitError: naming the archive, where it cannot be read.
    """
    with _tar_errors(archive), tarfile.open(archive) as tar:
        for member in tar:
            if not _is_image_member(member):
                continue
            name = _member_name(member)
            if names is not None and name not in names:
                continue
            file = tar.extractfile(member)
            if file is None:  # not reached for a regular file
                raise MagicInitError(f"data archive {str(archive)!r}: member {name!r} holds no data")
            yield name, file.read()


def _read_tar(archive: Path, samples: int, seed: int, input_size: int, channels: int) -> Tensor:
    """The images of a tar archive as ``_read_folder`` reads them from the folder it unpacks to."""
    names = _chosen_images(tar_image_names(archive), f"data archive {str(archive)!r}", samples, seed)
    images = {
        name: _read_image(io.BytesIO(data), f"{name!r} in {str(archive)!r}", input_size, channels)
        for name, data in iter_tar_images(archive, set(names))
    }
    missing = [name for name in names if name not in images]
    if missing:
        raise MagicInitError(f"data archive {str(archive)!r} changed while it was read: {missing[0]!r} is gone")
    return torch.stack([images[name] for name in names])


PIXEL_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}


def _as_float_images(values: Tensor, origin: str, images_3d: bool = False) -> Tensor:
    """Float32 (uint8/uint16 scaled to [0, 1]), 3-d images given a channel axis, channels first."""
    if values.is_complex() or values.is_sparse:
        raise MagicInitError(f"{origin}: complex or sparse data are not supported")
    scale = PIXEL_SCALE.get(values.dtype, 1.0)
    values = values.float() / scale
    if values.dim() < 2:
        raise MagicInitError(f"{origin}: expected samples along the first axis, got shape {tuple(values.shape)}")
    if values.shape[0] == 0 or values.numel() == 0:
        raise MagicInitError(f"{origin}: holds no samples (shape {tuple(values.shape)})")
    if values.dim() == 3 and (images_3d or values.shape[1] == values.shape[2]):
        values = values.unsqueeze(1)  # (N, H, W) grayscale images
    if values.dim() == 4 and values.shape[-1] in (1, 3, 4) and values.shape[1] not in (1, 3, 4):
        log.info("%s: channels-last array %s made channels-first", origin, tuple(values.shape))
        values = values.permute(0, 3, 1, 2)
    return values.contiguous()


def resize_images(images: Tensor, size: int) -> Tensor:
    """Images ``(N, C, H, W)`` resized to ``size x size`` (bilinear, antialiased when shrinking)."""
    return nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _resize(values: Tensor, input_size: int | None, origin: str) -> Tensor:
    if input_size is None or tuple(values.shape[2:]) == (input_size, input_size):
        return values
    if values.dim() != 4:
        raise MagicInitError(f"{origin}: --input-size applies to images (N, C, H, W), not shape {tuple(values.shape)}")
    return resize_images(values, input_size)


def _read_file(path: Path, key: str | None) -> Tensor:
    """An array file as float images; every failure to read it is an error naming the file."""
    name = path.name.lower()
    is_idx = "idx" in name or name.endswith(("ubyte.gz", "ubyte"))
    try:
        if name.endswith((".npy", ".npz")):
            values = _read_numpy(path, key)
        elif name.endswith((".pt", ".pth")):
            values = _read_torch(path, key)
        elif is_idx:
            values = read_idx(path)
        else:
            raise MagicInitError(
                f"data file {str(path)!r}: unknown kind; use a folder or a .tar/.tar.gz of images, .npy, .npz, .pt, "
                "or an idx file"
            )
        return _as_float_images(values, f"data file {str(path)!r}", images_3d=is_idx)
    except MagicInitError:
        raise
    except Exception as error:  # truncated archives, odd dtypes, ...: each reader has its own exception types
        raise MagicInitError(f"data file {str(path)!r} cannot be read: {type(error).__name__}: {error}") from None


def data_path(source: str) -> Path | None:
    """The file or folder that ``load_images(source)`` reads; None for a built-in set (a name in ``BUILT_IN``
    that names no file or folder here)."""
    path = Path(source)
    return None if source in BUILT_IN and not path.exists() else path


def load_images(
    source: str,
    *,
    samples: int = 256,
    seed: int = 0,
    input_size: int | None = None,
    channels: int = 3,
    key: str | None = None,
    standardize: bool = True,
) -> Tensor:
    """The init data named by ``source`` (a folder, a file or a built-in name), as one tensor.

    Args:
        source: folder of images, tar archive of images (a name ending with one of ``TAR_SUFFIXES``),
            ``.npy``/``.npz``/``.pt``/``.pth`` file, idx file, or a name in ``BUILT_IN``.
        samples: at most this many samples (a seeded random subset where there are more).
        seed: seed of that subset and of generated data.
        input_size: images are resized to ``input_size x input_size`` (folders and archives: shorter side, then
            centre crop; arrays: bilinear, antialiased); None keeps an array's size (folders and archives need it).
        channels: 1 (grayscale) or 3 (RGB) for images read from a folder or an archive, or generated.
        key: the array or entry to read from an ``.npz`` or a ``.pt`` dict/tuple.
        standardize: make every channel mean 0 and std 1 over the loaded samples.

    Raises:
        MagicInitError: naming the file that cannot be read, or the source that is unknown.
    """
    if samples < 1:
        raise MagicInitError(f"samples={samples}: must be at least 1")
    path = data_path(source)
    if path is None:
        values = _as_float_images(BUILT_IN[source](samples, seed, channels), f"data {source!r}", images_3d=True)
    elif path.is_dir() or (path.is_file() and is_tar_file_name(path)):
        if input_size is None:
            kind = "folder" if path.is_dir() else "archive"
            raise MagicInitError(f"data {kind} {source!r}: give the images' size with --input-size")
        read = _read_folder if path.is_dir() else _read_tar
        values = read(path, samples, seed, input_size, channels)
    elif path.is_file():
        values = _read_file(path, key)
    else:
        known = ", ".join(BUILT_IN)
        raise MagicInitError(f"data {source!r}: no such file or folder, and not a built-in name ({known})")
    chosen = _subset(values.shape[0], samples, seed)
    if chosen is not None:
        values = values[chosen]
    values = _resize(values, input_size, f"data {source!r}")
    if not bool(torch.isfinite(values).all()):
        raise MagicInitError(f"data {source!r} contains NaN or Inf values")
    if standardize and values.dim() >= 2:
        axes = [0, *range(2, values.dim())]
        wide = values.double()  # float32 squares of values near 1e20 and beyond would overflow
        mean = wide.mean(dim=axes, keepdim=True)
        std = wide.std(dim=axes, keepdim=True, correction=0)
        values = ((wide - mean) / torch.where(std > 0, std, torch.ones_like(std))).to(values.dtype)
    return values
