"""Build ``fastdiff/assets/digits16.npz``, the built-in ``"digits"`` data set.

Source: scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten Digits"
test set (``sklearn.datasets.load_digits``: 1797 images, 8x8, values 0..16, BSD-licensed).
Each image is upscaled to 16x16 with Pillow's bilinear filter (on float pixels, so no
intermediate rounding), clipped to the source range and quantised to uint8 0..255.
(Bilinear rather than bicubic: no overshoot, and the file compresses to ~256 KiB instead
of ~320 KiB.)  Ink is white on a black background (0 = background), as in the source.

Output arrays (compressed npz):
    images  uint8 (N, 1, 16, 16)
    labels  uint8 (N,)

scikit-learn is needed only to run this script, not by fastdiff itself::

    python tools/make_digits_asset.py [--out fastdiff/assets/digits16.npz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 16
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "fastdiff" / "assets" / "digits16.npz"


def upscale(image8: np.ndarray, size: int = SIZE) -> np.ndarray:
    """One (8, 8) image with values 0..16 -> (size, size) uint8 0..255."""
    scaled = image8.astype(np.float32) * (255.0 / 16.0)
    big = Image.fromarray(scaled, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.rint(np.asarray(big)), 0, 255).astype(np.uint8)


def build(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 1, size, size), labels uint8 (N,))."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([upscale(im, size) for im in digits.images])[:, None]
    labels = digits.target.astype(np.uint8)
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz path")
    args = parser.parse_args()
    images, labels = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=images, labels=labels)
    size_kb = args.out.stat().st_size / 1024
    print(f"wrote {args.out}: images {images.shape} {images.dtype}, {size_kb:.1f} KiB")
    if size_kb >= 300:
        raise SystemExit(f"asset too large: {size_kb:.1f} KiB (limit 300 KiB)")


if __name__ == "__main__":
    main()
