"""Ordinary pictures (PNG, JPEG) as grey images, for ``fracwatch predict`` and image-folder data sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fracwatch.errors import FracwatchError

PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
# The pixel budget of one image (picture or DICOM frame stack), checked from the header before any decoding:
# 2^25 (33.5 million) pixels holds a stitched long-leg or spine radiograph (about 7000 x 3000) with room to
# spare, and keeps a decompression bomb (issue 35's 30000 x 30000 PNG of 856 KB) from reaching the decoder.
MAX_PIXELS = 1 << 25


class PictureError(FracwatchError):
    """The file is not a readable picture."""


def load_picture(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A 2-D float32 array (bright = dense, as pictures of radiographs are shown); colour is averaged to grey.

    A picture larger than ``max_pixels`` is refused from its header, before it is decoded.
    """
    try:
        with Image.open(path) as picture:
            width, height = picture.size
            if width * height > max_pixels:
                raise PictureError(
                    f"{path.name} is {width} x {height} pixels, over the budget of {max_pixels} pixels an image"
                )
            picture.load()
            if picture.mode in ("I;16", "I;16B", "I", "F"):
                array = np.asarray(picture, dtype=np.float32)
            else:
                array = np.asarray(picture.convert("L"), dtype=np.float32)
    except Image.DecompressionBombError as exc:  # Pillow's own limit, hit at open for the largest headers
        raise PictureError(f"{path.name} is over the pixel budget: {exc}") from exc
    except (OSError, UnidentifiedImageError) as exc:
        raise PictureError(f"{path.name} is not a readable picture: {exc}") from exc
    if array.ndim != 2:
        raise PictureError(f"{path.name}: unexpected picture shape {array.shape}")
    return array


def colourfulness(path: Path) -> float:
    """Mean chroma of a picture (0 grey, 1 saturated), from a 256-pixel thumbnail; 0 for grey modes. The file
    has passed ``load_picture`` (a readable picture within the pixel budget)."""
    with Image.open(path) as picture:
        if picture.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "F"):
            return 0.0
        picture.thumbnail((256, 256))
        rgb = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean())
