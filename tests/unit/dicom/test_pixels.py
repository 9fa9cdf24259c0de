"""The grayscale pipeline on generated images: MONOCHROME1/2, rescale, windows, frames, corrupt data."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from fracwatch.config import load_settings
from fracwatch.dicom.pixels import PixelDataError, decode_dataset
from fracwatch.model.bundle import load_bundle
from fracwatch.model.predictor import Predictor
from fracwatch.service.scoring import load_dicom, score_loaded
from tests import dicomgen


def with_meta(ds: Dataset) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def mono_pair() -> tuple[Dataset, Dataset]:
    ids = dicomgen.StudyIds()
    mono2 = with_meta(dicomgen.image(ids, rows=300, columns=260, seed=5))
    mono1 = with_meta(dicomgen.image(ids, rows=300, columns=260, seed=5))
    stored = np.frombuffer(mono2.PixelData, dtype=np.uint16)
    mono1.PixelData = (4095 - stored).astype(np.uint16).tobytes()
    mono1.PhotometricInterpretation = "MONOCHROME1"
    return mono1, mono2


def test_monochrome1_and_2_give_the_same_probability() -> None:
    mono1, mono2 = mono_pair()
    bundle = load_bundle(load_settings().model_path)
    predictor, config = Predictor(bundle.network, "cpu"), bundle.preprocess_config
    p1, p2 = score_loaded([load_dicom(mono1, config), load_dicom(mono2, config)], predictor, config)
    assert p1 is not None and p2 is not None
    assert abs(p1 - p2) < 1e-4


def test_bright_means_dense_after_inversion() -> None:
    mono1, mono2 = mono_pair()
    a = decode_dataset(mono1).frames[0]
    b = decode_dataset(mono2).frames[0]
    assert np.allclose(a - a.mean(), b - b.mean(), atol=1e-2)


def test_rescale_and_window_are_applied() -> None:
    ds = with_meta(dicomgen.image(dicomgen.StudyIds(), rows=64, columns=64))
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -100
    ds.WindowCenter = 2000
    ds.WindowWidth = 1000
    frames = decode_dataset(ds).frames
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(64, 64).astype(np.float64)
    rescaled = stored * 2 - 100
    # values far below/above the window are clipped to the window's output range
    assert frames[0][rescaled < 1000].max() == pytest.approx(frames.min())
    assert frames[0][rescaled > 3000].min() == pytest.approx(frames.max())


def test_multiframe_is_decoded_per_frame() -> None:
    ds = with_meta(dicomgen.image(dicomgen.StudyIds(), rows=32, columns=32))
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    assert decode_dataset(ds).frames.shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]), "cannot be decoded"),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "RGB"), "not a grayscale radiograph"),
        (lambda ds: delattr(ds, "PixelData"), "no pixel data"),
        (lambda ds: setattr(ds, "NumberOfFrames", 500), "frames"),
    ],
)
def test_bad_pixels_give_a_clear_reason(change: object, reason: str) -> None:
    ds = with_meta(dicomgen.image(dicomgen.StudyIds(), rows=32, columns=32))
    change(ds)  # type: ignore[operator]
    with pytest.raises(PixelDataError, match=reason):
        decode_dataset(ds)
