"""Decode an image instance into presentation-ready grey levels: bright = dense (bone), whatever the encoding.

Order follows the DICOM grayscale pipeline (PS3.4 N.2): stored values (Bits Stored / Pixel Representation
honoured by the decoder) → Modality LUT or rescale → VOI LUT or the first window → MONOCHROME1 inversion.
MONOCHROME1 is inverted by negation: every later step (percentile scaling) is affine-invariant, so a
MONOCHROME1 image and its MONOCHROME2 twin give the same network input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from fracwatch.dicom import j2k
from fracwatch.errors import FracwatchError
from fracwatch.resample import block_mean, downsample_factor

MAX_FRAMES = 16


class PixelDataError(FracwatchError):
    """The pixel data cannot be decoded or is not a single-channel radiograph."""


@dataclass(frozen=True)
class DecodedImage:
    """Frames of one instance as float32 arrays (frames, rows, columns), bright = dense."""

    frames: np.ndarray
    pixel_spacing: tuple[float, float] | None


def header_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) millimetres per pixel: Pixel Spacing, else Imager Pixel Spacing; None when neither is usable."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            try:
                return float(value[0]), float(value[1])
            except (TypeError, ValueError):
                return None
    return None


def _voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    if "VOILUTSequence" in ds:
        # a VOI LUT is indexed by stored-value units: look it up with integers
        values = np.rint(values).astype(np.int32)
    return np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=True), dtype=np.float32)


def decode_dataset(ds: Dataset, target_longest: int | None = None) -> DecodedImage:
    """Decode and apply the grayscale pipeline; raises :class:`PixelDataError` with the reason.

    With ``target_longest``, frames are area-downsampled by the largest integer factor that keeps the longest
    side at least that long, *before* the VOI transform: that is what makes a 10 MB radiograph cheap. A
    rescale (linear) commutes exactly with the block mean; a Modality LUT Sequence is applied at full size.
    """
    if "PixelData" not in ds:
        raise PixelDataError("instance has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PixelDataError(f"photometric interpretation {photometric or 'missing'} is not a grayscale radiograph")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise PixelDataError("more than one sample per pixel")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > MAX_FRAMES:
        raise PixelDataError(f"{frames} frames: more than the {MAX_FRAMES} a radiograph may have")
    stored, levels = _decoded(ds, target_longest)
    factor = downsample_factor(stored.shape, target_longest) if target_longest else 1
    try:
        if "ModalityLUTSequence" in ds:
            values = block_mean(np.asarray(apply_modality_lut(stored, ds), dtype=np.float32), factor)
        else:
            values = np.asarray(apply_modality_lut(block_mean(stored, factor), ds))
        out = _voi(values, ds)
    except Exception as exc:
        raise PixelDataError(f"modality or VOI LUT cannot be applied: {exc}") from exc
    if photometric == "MONOCHROME1":
        out = np.negative(out)
    if not np.isfinite(out).all():
        raise PixelDataError("pixel values are not finite after the LUTs")
    spacing = header_spacing(ds)
    scale = factor * 2**levels
    if spacing is not None and scale > 1:
        spacing = (spacing[0] * scale, spacing[1] * scale)
    return DecodedImage(frames=out, pixel_spacing=spacing)


def _decoded(ds: Dataset, target_longest: int | None) -> tuple[np.ndarray, int]:
    """Stored values (frames, rows, columns) and how many halvings they were decoded at: a JPEG 2000 image that
    is to be downsampled anyway comes out of its codestream at the largest power of two inside the factor
    (``j2k``), everything else at full size. A Modality LUT Sequence applies at full size, so it stays full."""
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if target_longest and rows and columns and "ModalityLUTSequence" not in ds:
        levels = j2k.levels_for(downsample_factor((rows, columns), target_longest))
        reduced = j2k.decode_reduced(ds, levels) if levels else None
        if reduced is not None:
            return reduced, levels
    return _full(ds), 0


def _full(ds: Dataset) -> np.ndarray:
    """Every frame's stored values at full size, (frames, rows, columns)."""
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoders raise many types on corrupt data
        raise PixelDataError(f"pixel data cannot be decoded: {exc}") from exc
    if stored.ndim == 2:
        stored = stored[np.newaxis]
    if stored.ndim != 3:
        raise PixelDataError(f"unexpected pixel array shape {stored.shape}")
    return stored
