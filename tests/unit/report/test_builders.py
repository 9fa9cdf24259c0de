"""The SR, overlay and KOS builders cope with sources that omit Type 2 attributes; dciodvfy finds no error."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset

from fracwatch.report.overlay import OverlayImage, build_kos, build_overlay
from fracwatch.report.sr import AlgorithmIdentity, ScoredImage, build_sr
from tests import dicomgen
from tests.integration.test_scoring import dciodvfy_errors

IDENTITY = AlgorithmIdentity("fracwatch-phantom", "0.1.0", "2.25.12345", "0.1.0")


def sparse_header() -> Dataset:
    """A DX header as a careless modality sends it: no birth date, sex, study date, laterality, orientation."""
    ds = dicomgen.image(dicomgen.StudyIds(), rows=64, columns=64)
    missing = (
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "ReferringPhysicianName",
        "AccessionNumber",
        "ImageLaterality",
        "PatientOrientation",
        "ImagerPixelSpacing",
        "PixelData",
    )
    for keyword in missing:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


@pytest.mark.parametrize("kind", ["sr", "sc", "kos"])
def test_objects_from_sparse_sources_validate(kind: str, tmp_path: Path) -> None:
    header = sparse_header()
    if kind == "sr":
        obj: Dataset = build_sr([ScoredImage(header, 0.7, "doubt")], 0.7, "doubt", IDENTITY, datetime.now(UTC))
    elif kind == "sc":
        image = OverlayImage(
            header, np.random.rand(64, 64).astype(np.float32), np.zeros((64, 64), np.float32), 0.7, "doubt"
        )
        obj = build_overlay(image, IDENTITY, "1.2.826.0.1.3680043.8.498.1", 1)
    else:
        obj = build_kos([header], IDENTITY)
    path = tmp_path / f"{kind}.dcm"
    obj.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert "PatientBirthDate" not in header  # the source header was not modified


def test_sr_round_trips_through_highdicom(tmp_path: Path) -> None:
    header = sparse_header()
    sr = build_sr([ScoredImage(header, 0.25, "negative")], 0.25, "negative", IDENTITY, datetime.now(UTC))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    document = hd.sr.srread(path)
    (group, study_group) = document.content.get_image_measurement_groups()
    assert group.get_qualitative_evaluations()[0].value.value == "2667000"  # Absent
    assert float(study_group.get_measurements()[0].value) == pytest.approx(0.25)


def test_an_sr_from_a_real_cr_header_has_no_dciodvfy_errors_or_warnings(tmp_path: Path) -> None:
    """RG1 (pydicom's test data): a free-text Referring Physician (``ward``, the retired name form) and a
    Pixel Spacing of 0\\0 were copied into the SR as they were, and the equipment carried a Device UID."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    header = dcmread(get_testdata_file("RG1_UNCI.dcm"), stop_before_pixels=True)
    sr = build_sr([ScoredImage(header, 0.25, "negative")], 0.25, "negative", IDENTITY, datetime.now(UTC))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path, ("Error", "Warning")) == []
    assert str(sr.ReferringPhysicianName) == "ward^" and str(header.ReferringPhysicianName) == "ward"
    assert "ImagerPixelSpacing" not in header  # the source header was not modified
