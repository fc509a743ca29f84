"""Init data from files and built-in sets, for the command line.

``load_images(source, ...)`` reads, as one float32 tensor ``(N, C, H, W)``
(or ``(N, features)`` / ``(N, C, L)`` for arrays of that shape):

- a folder of images (searched recursively; Pillow reads them), each resized
  so its shorter side is ``input_size`` and centre-cropped to a square;
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
channels-first. Images read from a folder have 8 bits per channel (16-bit
grayscale is scaled down, not clipped). ``standardize`` makes every
channel mean 0 and std 1 over the loaded samples. At most ``samples`` samples
are used, a random subset drawn with ``seed`` where there are more.
"""

from __future__ import annotations

import gzip
import logging
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import MagicInitError

__all__ = [
    "BUILT_IN",
    "IMAGE_SUFFIXES",
    "data_path",
    "digits",
    "image_files",
    "is_image_file_name",
    "load_images",
    "read_idx",
    "resize_images",
    "smooth_images",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
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


def _read_image(path: Path, size: int, channels: int) -> Tensor:
    try:
        from PIL import Image
    except ImportError:
        raise MagicInitError("reading an image folder needs Pillow: pip install 'magicinit[cli]'") from None
    try:
        with Image.open(path) as opened:
            image: Image.Image = opened  # converted below into other images
            if image.mode.startswith("I;16"):
                image = image.convert("I")
            if image.mode == "I":  # 16-bit grayscale: scale to 8 bits rather than clip
                image = image.point(lambda value: value * (1 / 256))
            image = image.convert("L" if channels == 1 else "RGB")
            scale = size / min(image.size)
            width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((width, height), Image.Resampling.BILINEAR)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise MagicInitError(f"image {str(path)!r} cannot be read: {error}") from None
    return pixels.reshape(size, size, -1).permute(2, 0, 1).float() / 255.0


def _subset(count: int, samples: int, seed: int) -> Tensor | None:
    if count <= samples:
        return None
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:samples].sort().values


def is_image_file_name(path: Path) -> bool:
    """Whether a folder of images given as data would read ``path`` as one of its images (by its suffix)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: Path) -> list[Path]:
    """The images a folder given as data holds: its files (searched recursively) with an image suffix, sorted."""
    return sorted(path for path in folder.rglob("*") if is_image_file_name(path) and path.is_file())


def _read_folder(folder: Path, samples: int, seed: int, input_size: int, channels: int) -> Tensor:
    files = image_files(folder)
    if not files:
        raise MagicInitError(f"data folder {str(folder)!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    chosen = _subset(len(files), samples, seed)
    if chosen is not None:
        files = [files[i] for i in chosen.tolist()]
    return torch.stack([_read_image(path, input_size, channels) for path in files])


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
                f"data file {str(path)!r}: unknown kind; use a folder of images, .npy, .npz, .pt, or an idx file"
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
        source: folder of images, ``.npy``/``.npz``/``.pt``/``.pth`` file, idx file, or a name in ``BUILT_IN``.
        samples: at most this many samples (a seeded random subset where there are more).
        seed: seed of that subset and of generated data.
        input_size: images are resized to ``input_size x input_size`` (folders: shorter side, then centre
            crop; arrays: bilinear, antialiased); None keeps an array's size (folders need it).
        channels: 1 (grayscale) or 3 (RGB) for images read from a folder or generated.
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
    elif path.is_dir():
        if input_size is None:
            raise MagicInitError(f"data folder {source!r}: give the images' size with --input-size")
        values = _read_folder(path, samples, seed, input_size, channels)
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
