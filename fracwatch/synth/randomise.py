"""Domain randomisation for ``fracwatch synth --randomise``: how a radiograph looks varies between sites far more
than one generator's defaults do, and a model that learns one look learns the look (issue 36: the shipped model
drops to chance on images rendered differently). With ``--randomise`` every image draws, from its twin-shared
``look`` generator (so a twin pair still differs only by its break):

- the beam: the soft-tissue transmission the exposure is scaled to (energy and patient size), 1.6–2.8 nepers;
- scatter: a wide blur of the primary added at 0–30 %, and electronic noise of 0–3 counts;
- the window: its low and high percentiles (0–2, 98.5–99.9) and the LUT's shape — a power law (gamma 0.6–1.6)
  or a sigmoid (centre and width from the image's histogram);
- burned-in content: a collimator shadow along some edges (unexposed: white), an "R"/"L" side marker and, at
  times, a line of text in a corner — what real films carry and a model must learn to ignore.

Without ``--randomise`` no extra draws are made: sets rendered before render the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter

TEXTS = ("AP", "PA", "ERECT", "SUPINE", "PORTABLE", "XR CHEST", "12:04", "2026-03-14", "L 3", "KV 85")


@dataclass(frozen=True)
class Look:
    """One image's drawn appearance."""

    transmission: float
    scatter: float
    electronic_noise: float
    window: tuple[float, float]
    sigmoid: bool
    gamma: float
    sigmoid_width: float


def draw_look(rng: np.random.Generator) -> Look:
    return Look(
        transmission=float(rng.uniform(1.6, 2.8)),
        scatter=float(rng.uniform(0.0, 0.3)),
        electronic_noise=float(rng.uniform(0.0, 3.0)),
        window=(float(rng.uniform(0.0, 2.0)), float(rng.uniform(98.5, 99.9))),
        sigmoid=bool(rng.random() < 0.5),
        gamma=float(rng.uniform(0.6, 1.6)),
        sigmoid_width=float(rng.uniform(0.15, 0.35)),
    )


def add_scatter(expected: np.ndarray, look: Look, spacing_mm: float) -> np.ndarray:
    """Expected counts with scatter: a 40 mm-wide blur of the primary at ``look.scatter`` of it."""
    if look.scatter <= 0:
        return expected
    return expected + look.scatter * gaussian_filter(expected, sigma=40.0 / spacing_mm)


def display(log: np.ndarray, look: Look) -> np.ndarray:
    """Log signal → [0, 1] grey through the drawn window and LUT shape."""
    low, high = np.percentile(log, look.window)
    unit = np.clip((log - low) / max(high - low, 1e-6), 0, 1)
    if not look.sigmoid:
        return unit**look.gamma
    centre = float(np.median(unit))
    shaped = 1.0 / (1.0 + np.exp(-(unit - centre) / look.sigmoid_width))
    ends = 1.0 / (1.0 + np.exp(-(np.array([0.0, 1.0]) - centre) / look.sigmoid_width))
    return np.clip((shaped - ends[0]) / max(ends[1] - ends[0], 1e-6), 0, 1)


def burn_in(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """12-bit ``pixels`` (bone bright) with a collimator shadow, a side marker and text, each at times."""
    out = pixels.copy()
    rows, cols = out.shape
    if rng.random() < 0.3:  # collimation: unexposed bands along one to four edges
        for edge in np.flatnonzero(rng.random(4) < 0.5) if rng.random() < 0.9 else [int(rng.integers(4))]:
            depth = int(rng.uniform(0.03, 0.12) * (rows if edge < 2 else cols))
            level = rng.uniform(3600, 4095)
            band = np.clip(level + rng.normal(0, 20, (rows, cols)), 0, 4095).astype(np.uint16)
            where = [np.s_[:depth, :], np.s_[rows - depth :, :], np.s_[:, :depth], np.s_[:, cols - depth :]][edge]
            out[where] = band[where]
    if rng.random() < 0.5:
        out = _text(out, str(rng.choice(["R", "L"])), rng, height=rng.uniform(0.05, 0.1))
    if rng.random() < 0.3:
        out = _text(out, str(rng.choice(TEXTS)), rng, height=rng.uniform(0.025, 0.045))
    return out


def _text(pixels: np.ndarray, text: str, rng: np.random.Generator, height: float) -> np.ndarray:
    """``text`` burned in white at a random corner, ``height`` of the image's rows tall."""
    rows, cols = pixels.shape
    font = ImageFont.load_default()
    left, top, right, bottom = (int(v) for v in font.getbbox(text))
    glyphs = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(glyphs).text((1 - left, 1 - top), text, fill=255, font=font)
    scale = max(1.0, height * rows / glyphs.height)
    size = (max(1, round(glyphs.width * scale)), max(1, round(glyphs.height * scale)))
    mask = np.asarray(glyphs.resize(size, Image.Resampling.NEAREST), dtype=np.float32) / 255.0
    h, w = min(mask.shape[0], rows), min(mask.shape[1], cols)
    margin = int(0.02 * min(rows, cols))
    top_row = margin if rng.random() < 0.5 else max(0, rows - h - margin)
    left_col = margin if rng.random() < 0.5 else max(0, cols - w - margin)
    region = pixels[top_row : top_row + h, left_col : left_col + w].astype(np.float32)
    blended = region * (1 - mask[:h, :w]) + float(rng.uniform(3800, 4095)) * mask[:h, :w]
    out = pixels.copy()
    out[top_row : top_row + h, left_col : left_col + w] = np.clip(blended, 0, 4095).astype(np.uint16)
    return out
