"""JPEG 2000 frames decoded at a reduced resolution, for images that are downsampled anyway.

A JPEG 2000 codestream holds its image as wavelet resolution levels: decoding at level r skips the finer
levels' code blocks and returns the image at 1 / 2^r of its size (the 5/3 or 9/7 low-pass subband) — measured
here on a 3000 x 2500 12-bit lossless frame of noise, a full decode 1.4 s, at half size 0.31 s, at a quarter
0.08 s. The scorer downsamples a whole chest by an integer factor before anything else (``resample.block_mean``),
so it asks for the largest power of two inside that factor and block-averages the rest.

Pillow's JPEG 2000 plugin (OpenJPEG, ``Image.reduce``) does the decoding: pylibjpeg-openjpeg, pydicom's decoder,
has no reduced-resolution call. Pillow widens samples of fewer than 16 bits to 16 by a left shift; that shift is
undone and checked (every value a multiple of it), and anything this path is not sure of — signed or colour
samples, more levels than the codestream has, a shape that does not match — returns None so the caller decodes
at full size as before.

OpenJPEG decodes a codestream's code blocks on as many threads as ``OPJ_NUM_THREADS`` says, read each time a
decoder is made (one thread when it is unset); ``use_threads`` sets it for a scoring process. Measured on a
2-core machine, a 3000 x 2500 12-bit frame of noise at half size: 0.53 s on one thread, 0.29 s on two, the same
values. (pylibjpeg-openjpeg's full decode ignores it: 1.71 and 1.65 s.)
"""

from __future__ import annotations

import io
import logging
import math
import os

import numpy as np
import openjpeg  # type: ignore[import-untyped,unused-ignore]
from PIL import Image
from pydicom import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000, JPEG2000Lossless

LOGGER = logging.getLogger(__name__)

SYNTAXES = {JPEG2000Lossless, JPEG2000}


THREADS_ENV = "OPJ_NUM_THREADS"


def use_threads(count: int) -> None:
    """Let OpenJPEG decode on ``count`` threads in this process, unless the environment already says how many."""
    os.environ.setdefault(THREADS_ENV, str(max(1, count)))


def levels_for(factor: int) -> int:
    """The wavelet levels to skip for an integer downsampling ``factor``: the largest r with 2^r dividing it."""
    return (factor & -factor).bit_length() - 1 if factor >= 2 else 0


def decode_reduced(ds: Dataset, levels: int) -> np.ndarray | None:
    """(frames, ceil(rows / 2^levels), ceil(columns / 2^levels)) stored values of a single-channel unsigned
    JPEG 2000 instance decoded ``levels`` resolution levels down, or None where this path does not apply."""
    meta = getattr(ds, "file_meta", None)  # a dataset built in memory may have none
    if levels < 1 or meta is None or meta.get("TransferSyntaxUID") not in SYNTAXES:
        return None
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("PixelRepresentation", 0)) != 0:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    shape = (math.ceil(rows / 2**levels), math.ceil(columns / 2**levels))
    try:
        frames = [_frame(fragment, levels, shape) for fragment in generate_frames(ds.PixelData, number_of_frames=count)]
    except Exception as exc:  # Pillow and OpenJPEG raise many types on data they cannot reduce
        LOGGER.debug("reduced JPEG 2000 decode not used: %r", exc)
        return None
    if len(frames) != count or any(frame is None for frame in frames):
        return None
    return np.stack([frame for frame in frames if frame is not None])


def _frame(codestream: bytes, levels: int, shape: tuple[int, int]) -> np.ndarray | None:
    header = openjpeg.get_parameters(codestream)  # type: ignore[attr-defined]  # the SIZ marker, not decoded
    precision = int(header["precision"])
    if int(header["samples_per_pixel"]) != 1 or header["is_signed"] or not 1 <= precision <= 16:
        return None
    with Image.open(io.BytesIO(codestream)) as image:
        if image.mode not in ("L", "I;16"):
            return None
        image.reduce = levels  # type: ignore[method-assign,assignment,unused-ignore]  # Pillow: levels down
        image.load()
        values = np.asarray(image)
    if values.shape != shape:
        return None
    width = 8 if values.dtype == np.uint8 else 16
    if precision < width:
        shift = width - precision
        if np.any(values & ((1 << shift) - 1)):
            return None  # not a plain widening: leave it to the full decoder
        values = values >> shift
    return values
