"""Ordinary pictures (PNG, JPEG) as grey images, for ``fracwatch predict`` and image-folder data sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fracwatch.errors import FracwatchError

PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


class PictureError(FracwatchError):
    """The file is not a readable picture."""


def load_picture(path: Path) -> np.ndarray:
    """A 2-D float32 array (bright = dense, as pictures of radiographs are shown); colour is averaged to grey."""
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode in ("I;16", "I;16B", "I", "F"):
                array = np.asarray(picture, dtype=np.float32)
            else:
                array = np.asarray(picture.convert("L"), dtype=np.float32)
    except (OSError, UnidentifiedImageError) as exc:
        raise PictureError(f"{path.name} is not a readable picture: {exc}") from exc
    if array.ndim != 2:
        raise PictureError(f"{path.name}: unexpected picture shape {array.shape}")
    return array
