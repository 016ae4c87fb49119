"""Pixels in and out: convert between image files / uint8 pixels and model tensors.

The model works on float32 tensors of shape (N, C, H, W) with values in [-1, 1]; files and
image libraries use uint8 values 0..255.  The mapping is ``x / 127.5 - 1`` one way and
``round((x + 1) * 127.5)`` (clamped) the other, so uint8 -> model -> uint8 is lossless.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .atomic import atomic_write_bytes
from .errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "GRAYSCALE_MODES",
    "to_model_range",
    "to_uint8",
    "make_grid",
    "save_image_grid",
    "list_image_files",
    "load_image",
    "load_image_folder",
]

#: File name endings (lower case) that :func:`load_image_folder` reads.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

#: Pillow modes that hold one channel (treated as grayscale).
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

_TOLERANCE = 1e-3


def to_model_range(images, *, name: str = "images") -> torch.Tensor:
    """Pixels -> float32 tensor in [-1, 1], same shape and device.

    ``images`` is a torch tensor or numpy array of any shape:

    * uint8 (or another integer type with all values in 0..255): mapped by ``x / 127.5 - 1``;
    * floating point: taken to be in [-1, 1] already and only cast to float32.

    Raises :class:`DataError` (naming ``name``) for NaN/inf values, floats outside
    [-1 - 1e-3, 1 + 1e-3] (values within the tolerance are kept as they are), integers outside
    0..255, or a bool/complex dtype.
    """
    x = _as_tensor(images, name)
    if x.dtype == torch.bool or x.is_complex():
        raise DataError(f"{name}: expected uint8 pixels 0..255 or floats in [-1, 1], got {x.dtype}")
    if x.numel() == 0:
        return x.to(torch.float32)
    if not x.is_floating_point():
        if x.dtype != torch.uint8:
            lo, hi = (int(v) for v in torch.aminmax(x))
            if lo < 0 or hi > 255:
                raise DataError(
                    f"{name}: integer pixels must be in 0..255, found values in [{lo}, {hi}]"
                )
        return x.to(torch.float32).div_(127.5).sub_(1.0)
    x = x.to(torch.float32)
    lo, hi = (float(v) for v in torch.aminmax(x))  # NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise DataError(
            f"{name}: contains non-finite values ({n_nan} NaN, {n_inf} inf); "
            "expected finite floats in [-1, 1]"
        )
    if lo < -1.0 - _TOLERANCE or hi > 1.0 + _TOLERANCE:
        hint = " (uint8-like 0..255 floats? pass uint8, or divide by 127.5 and subtract 1)"
        raise DataError(
            f"{name}: float values must be in [-1, 1], found range [{lo:.4g}, {hi:.4g}]"
            + (hint if hi > 1.5 else "")
        )
    return x


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float tensor in [-1, 1] (any shape) -> uint8 tensor 0..255, clamped and rounded."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        return x
    x = x.detach().to(torch.float32)
    return x.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def make_grid(
    images,
    nrow: int | None = None,
    padding: int = 2,
    *,
    scale: int = 1,
    pad_value: int = 128,
) -> np.ndarray:
    """Tile images into one picture: (N, C, H, W) -> uint8 numpy array (H', W', C).

    ``images`` is a tensor or array in [-1, 1] (float) or 0..255 (uint8), C = 1 or 3.
    ``nrow`` images per row (default ``ceil(sqrt(N))``); each image is enlarged ``scale``
    times with nearest-neighbour (so 16x16 digits stay crisp); ``padding`` pixels of
    ``pad_value`` separate and surround the tiles.  The result has
    ``H' = rows * (H * scale + padding) + padding`` and likewise for ``W'`` with ``nrow``.
    """
    x = torch.as_tensor(images).detach()
    if x.dim() != 4 or x.shape[0] == 0 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"images: expected shape (N, C, H, W) with N >= 1 and C in (1, 3), got {tuple(x.shape)}"
        )
    if not (isinstance(scale, int) and scale >= 1):
        raise ValueError(f"scale: expected an integer >= 1, got {scale!r}")
    if padding < 0:
        raise ValueError(f"padding: expected >= 0, got {padding!r}")
    n, c, h, w = x.shape
    ncol = nrow if nrow is not None else math.ceil(math.sqrt(n))
    if ncol < 1:
        raise ValueError(f"nrow: expected >= 1, got {nrow!r}")
    ncol = min(ncol, n)
    nrows = math.ceil(n / ncol)
    pixels = to_uint8(x).cpu()
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    h, w = h * scale, w * scale
    grid = torch.full(
        (c, nrows * (h + padding) + padding, ncol * (w + padding) + padding),
        int(pad_value),
        dtype=torch.uint8,
    )
    for k in range(n):
        top = padding + (k // ncol) * (h + padding)
        left = padding + (k % ncol) * (w + padding)
        grid[:, top : top + h, left : left + w] = pixels[k]
    return grid.permute(1, 2, 0).contiguous().numpy()


def save_image_grid(
    images,
    path,
    nrow: int | None = None,
    padding: int = 2,
    *,
    scale: int = 1,
    pad_value: int = 128,
) -> Path:
    """Write :func:`make_grid` of ``images`` (N, C, H, W) as a PNG at ``path``; return the path.

    Parent folders are created.  The file is written atomically: to a temporary file in the
    same folder, then renamed over ``path``, so a reader never sees a half-written image.
    """
    grid = make_grid(images, nrow, padding, scale=scale, pad_value=pad_value)
    picture = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    encoded = io.BytesIO()
    picture.save(encoded, format="PNG")
    path = atomic_write_bytes(path, encoded.getvalue())
    return path


def list_image_files(folder) -> list[Path]:
    """All image files (see :data:`IMAGE_EXTENSIONS`) under ``folder``, recursively, sorted.

    Raises :class:`DataError` if ``folder`` does not exist or is not a folder.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"data: image folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise DataError(f"data: {str(folder)!r} is not a folder")
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def load_image(path, image_size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 array (image_size, image_size, channels).

    EXIF orientation is applied, the image is converted to "L" (channels=1) or "RGB"
    (channels=3), center-cropped to a square and resized (LANCZOS when shrinking, BICUBIC
    when enlarging).
    """
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"channels: expected 1 or 3 for image files, got {channels!r}")
    try:
        with Image.open(path) as opened:
            picture = ImageOps.exif_transpose(opened)
            picture = _convert(picture, mode)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"data: cannot read image {str(path)!r}: {err}") from err
    w, h = picture.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    picture = picture.crop((left, top, left + side, top + side))
    if side != image_size:
        resample = Image.Resampling.LANCZOS if side > image_size else Image.Resampling.BICUBIC
        picture = picture.resize((image_size, image_size), resample)
    array = np.asarray(picture, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def load_image_folder(path, image_size: int, channels: int) -> torch.Tensor:
    """All images under folder ``path`` -> uint8 tensor (N, channels, image_size, image_size).

    Files with the endings in :data:`IMAGE_EXTENSIONS` are read recursively in sorted path
    order and prepared by :func:`load_image`.  Raises :class:`DataError` naming the folder
    if it is missing or holds no images, or naming the file that cannot be read.
    """
    if not (isinstance(image_size, int) and image_size >= 1):
        raise DataError(f"image_size: expected an integer >= 1, got {image_size!r}")
    files = list_image_files(path)
    if not files:
        raise DataError(
            f"data: image folder {str(path)!r} holds no images "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)"
        )
    out = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    for k, file in enumerate(files):
        out[k] = load_image(file, image_size, channels)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _convert(picture: Image.Image, mode: str) -> Image.Image:
    """Convert to "L"/"RGB"; 16-bit grayscale is rescaled to 8 bits (Pillow would clip it)."""
    if picture.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        values = np.asarray(picture, dtype=np.float64) * (255.0 / 65535.0)
        picture = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return picture if picture.mode == mode else picture.convert(mode)


def _as_tensor(images, name: str) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.detach()
    if isinstance(images, np.ndarray):
        if images.dtype == object or images.dtype.kind in "USV":
            raise DataError(f"{name}: expected a numeric array, got dtype {images.dtype}")
        if not images.flags.writeable:
            images = images.copy()
        return torch.from_numpy(np.ascontiguousarray(images))
    raise DataError(f"{name}: expected a torch.Tensor or numpy array, got {type(images).__name__}")
