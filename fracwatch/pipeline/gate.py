"""The out-of-scope gate: before an image is scored, is it a projection radiograph at all?

A CNN trained on radiographs gives a probability for anything it is shown — a SMPTE test pattern once came out
"fracture possible (p = 0.41)". The gate refuses, with a reason, what is plainly not a radiograph: a blank
image, a test pattern or drawing (few grey levels, or bars and bands only), a document or screen capture
(most pixels in a handful of grey levels), a colour picture. The rules are the bundle's (``ModelCard.scope``),
so they are versioned with the model; the decision is made on the decoded frame, before any preprocessing.

Measured with ``bench/gate.py`` (200 of each, seeded): no false skip on 200 synthetic phantoms, RG1 and RG3
(uncompressed and JPEG 2000) and 200 noise test images; caught: colour pictures and CT-like slices 200 of 200,
text pages 72, checkerboards 49, SMPTE bars 18 and gradients 18 of 200 — the clean ones; with sensor noise of
a few grey levels a pattern passes every rule, and a blank frame with noise always does. These rules catch what
is plainly synthetic; a learned gate (issue 36) is what would close the gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

THUMBNAIL = 256  # the longest side the statistics are computed at
PATTERN_SIDE = 128  # the square the rank test resamples to


@dataclass(frozen=True)
class GateRules:
    """Thresholds of the gate (a bundle's ``scope``)."""

    rules_version: str = "1"
    min_grey_levels: int = 32  # distinct levels in the 8-bit thumbnail between the 0.5 / 99.5 percentiles
    max_dominant_share: float = 0.9  # share of pixels in the 8 most frequent levels (a text page 0.94, RG3 0.50)
    min_pattern_residual: float = 1e-4  # variance left after a rank-3 fit (clean bars ~0; 100 phantoms >= 2.1e-4)
    max_colour: float = 0.04  # mean chroma of a picture, as a fraction of full scale


@dataclass(frozen=True)
class GateFigures:
    """What the gate measured on one frame."""

    grey_levels: int
    dominant_share: float
    pattern_residual: float


def measure(frame: np.ndarray) -> GateFigures | None:
    """The gate's statistics of a grey frame; None for a blank frame (one value throughout)."""
    pixels = np.asarray(frame, dtype=np.float64)
    step = max(1, max(pixels.shape[:2]) // THUMBNAIL)
    thumb = pixels[::step, ::step]
    low, high = np.percentile(thumb, [0.5, 99.5])
    if not high > low:
        return None
    scaled = np.clip((thumb - low) / (high - low), 0.0, 1.0)
    levels = np.round(scaled * 255).astype(np.uint8)
    counts = np.bincount(levels.ravel(), minlength=256)
    dominant = float(np.sort(counts)[-8:].sum() / levels.size)
    return GateFigures(int(np.count_nonzero(counts)), dominant, _pattern_residual(scaled))


def _pattern_residual(scaled: np.ndarray) -> float:
    """The share of the image's variance a rank-3 approximation leaves: about 0 for bars, bands and gradients
    (test patterns), well above for anatomy."""
    rows = np.linspace(0, scaled.shape[0] - 1, PATTERN_SIDE).round().astype(int)
    cols = np.linspace(0, scaled.shape[1] - 1, PATTERN_SIDE).round().astype(int)
    square = scaled[np.ix_(rows, cols)]
    centred = square - square.mean()
    energy = np.linalg.svd(centred, compute_uv=False) ** 2
    total = float(energy.sum())
    return float(energy[3:].sum() / total) if total > 0 else 0.0


def out_of_scope(frame: np.ndarray, rules: GateRules) -> str | None:
    """Why ``frame`` is not a projection radiograph the model may score, or None when it may be scored."""
    figures = measure(frame)
    if figures is None:
        return "not a radiograph: a blank image (one grey value throughout)"
    if figures.grey_levels < rules.min_grey_levels:
        return (
            f"not a radiograph: only {figures.grey_levels} grey levels (a test pattern, a drawing or a mask; "
            f"a radiograph has {rules.min_grey_levels} or more)"
        )
    if figures.dominant_share > rules.max_dominant_share:
        return (
            f"not a radiograph: {figures.dominant_share:.0%} of the pixels in 8 grey levels "
            "(a document, a screen capture or a test pattern)"
        )
    if figures.pattern_residual < rules.min_pattern_residual:
        return "not a radiograph: bars, bands or a gradient only (a test pattern)"
    return None


def colour_reason(colourfulness: float, rules: GateRules) -> str | None:
    """Why a picture whose mean chroma is ``colourfulness`` (0-1) is out of scope, or None."""
    if colourfulness > rules.max_colour:
        return f"not a radiograph: a colour picture (mean chroma {colourfulness:.2f}; a photograph or a screen capture)"
    return None
