"""JPEG 2000 images that are downsampled anyway are decoded at a reduced resolution: the same image as its
uncompressed twin up to the low-pass filter, at the right spacing; anything else falls back to a full decode."""

from __future__ import annotations

import os

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from fracwatch.config import load_settings
from fracwatch.dicom import j2k
from fracwatch.dicom.pixels import decode_dataset
from fracwatch.model.bundle import load_bundle
from fracwatch.model.predictor import Predictor
from fracwatch.pipeline.transforms import preprocess


@pytest.mark.parametrize(("factor", "levels"), [(1, 0), (2, 1), (3, 0), (4, 2), (6, 1), (8, 3), (12, 2)])
def test_levels_are_the_largest_power_of_two_inside_the_factor(factor: int, levels: int) -> None:
    assert j2k.levels_for(factor) == levels


def test_a_real_j2k_cr_decoded_at_half_size_matches_its_uncompressed_twin() -> None:
    """NEMA's RG1 chest CR (1955 x 1841, 15 bits, MONOCHROME1), lossless JPEG 2000 against uncompressed, both
    decoded for a longest side of at least 900: a factor of 2, so the JPEG 2000 one skips a wavelet level."""
    compressed = dcmread(get_testdata_file("RG1_J2KR.dcm"))
    levels = j2k.levels_for(2)
    reduced = j2k.decode_reduced(compressed, levels)
    assert reduced is not None and reduced.shape == (1, 978, 921)  # ceil(1955 / 2), ceil(1841 / 2)
    assert reduced.dtype == np.uint16 and int(reduced.max()) < 2**15  # Pillow's widening to 16 bits undone

    full = decode_dataset(dcmread(get_testdata_file("RG1_UNCR.dcm")), target_longest=900)
    fast = decode_dataset(dcmread(get_testdata_file("RG1_J2KR.dcm")), target_longest=900)
    assert full.frames.shape[1:] == (977, 920) and fast.frames.shape[1:] == (978, 921)
    bundle = load_bundle(load_settings().model_path)
    a, b = preprocess(full.frames[0], bundle.preprocess_config), preprocess(fast.frames[0], bundle.preprocess_config)
    assert float((a - b).abs().mean()) < 0.01  # inputs in [0, 1]: the two low-pass filters differ a little
    p_full, p_fast = Predictor(bundle.network, "cpu").predict([a, b])
    assert abs(p_full - p_fast) < 0.1  # measured 0.654 and 0.692 (docs/pipeline.md)


def test_what_the_reduced_path_cannot_do_falls_back_to_the_full_decode() -> None:
    uncompressed = dcmread(get_testdata_file("RG1_UNCR.dcm"))
    assert j2k.decode_reduced(uncompressed, 1) is None  # not JPEG 2000
    compressed = dcmread(get_testdata_file("RG1_J2KR.dcm"))
    assert j2k.decode_reduced(compressed, 0) is None  # nothing to skip
    assert j2k.decode_reduced(compressed, 12) is None  # more levels than the codestream has
    signed = dcmread(get_testdata_file("RG1_J2KR.dcm"))
    signed.PixelRepresentation = 1
    assert j2k.decode_reduced(signed, 1) is None
    whole = decode_dataset(dcmread(get_testdata_file("RG1_J2KR.dcm")), target_longest=4000)
    assert whole.frames.shape[1:] == (1955, 1841)  # no downsampling asked: full size, as before
    spaced = dcmread(get_testdata_file("RG1_J2KR.dcm"))
    spaced.PixelSpacing = [0.1, 0.1]
    assert decode_dataset(spaced, target_longest=480).pixel_spacing == pytest.approx((0.4, 0.4))  # 2 levels: x4


def test_openjpeg_on_two_threads_decodes_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    compressed = dcmread(get_testdata_file("RG1_J2KR.dcm"))
    monkeypatch.delenv(j2k.THREADS_ENV, raising=False)
    alone = j2k.decode_reduced(compressed, 1)
    j2k.use_threads(2)
    assert j2k.THREADS_ENV in os.environ and os.environ[j2k.THREADS_ENV] == "2"
    together = j2k.decode_reduced(compressed, 1)
    assert alone is not None and together is not None
    np.testing.assert_array_equal(alone, together)
    j2k.use_threads(4)  # the environment's own figure (an admin's) wins
    assert os.environ[j2k.THREADS_ENV] == "2"
