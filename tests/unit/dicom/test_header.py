"""Header parsing from real encoded datasets, every transfer syntax family."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)

from fracwatch.dicom.header import header_from_file, header_from_stream, source_ae_of_file
from fracwatch.errors import InvalidInstanceError
from tests import dicomgen


def encode(ds: object, syntax: str) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = syntax != ExplicitVRBigEndian
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(buffer, ds)  # type: ignore[arg-type]
    raw = buffer.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        raw = compressor.compress(raw) + compressor.flush()
    return raw


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
)
def test_header_from_stream(syntax: str) -> None:
    ids = dicomgen.StudyIds(accession="A123")
    ds = dicomgen.image(ids, modality="CR", sop_class=dicomgen.CR_IMAGE, body_part="HAND", series_number=7)
    header = header_from_stream(io.BytesIO(encode(ds, syntax)), syntax)
    assert header.study_instance_uid == ids.study_uid
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.series_instance_uid == ds.SeriesInstanceUID
    assert header.sop_class_uid == dicomgen.CR_IMAGE
    assert header.transfer_syntax_uid == syntax
    assert (header.modality, header.body_part, header.accession_number, header.series_number) == (
        "CR",
        "HAND",
        "A123",
        7,
    )
    assert header.laterality == "L"


def test_missing_uid_is_named() -> None:
    ds = dicomgen.image(dicomgen.StudyIds())
    del ds.SeriesInstanceUID
    with pytest.raises(InvalidInstanceError, match="SeriesInstanceUID"):
        header_from_stream(io.BytesIO(encode(ds, ExplicitVRLittleEndian)), ExplicitVRLittleEndian)


def test_garbage_is_rejected() -> None:
    with pytest.raises(InvalidInstanceError):
        header_from_stream(io.BytesIO(b"\x08\x00\x16\x00\xff\xff\xff\x7f garbage"), ExplicitVRLittleEndian)
    with pytest.raises(InvalidInstanceError, match="cannot be parsed"):
        header_from_stream(io.BytesIO(b"not deflated"), DeflatedExplicitVRLittleEndian)


def test_sop_class_falls_back_to_request() -> None:
    ds = dicomgen.image(dicomgen.StudyIds())
    del ds.SOPClassUID
    header = header_from_stream(io.BytesIO(encode(ds, ExplicitVRLittleEndian)), ExplicitVRLittleEndian, "1.2.3")
    assert header.sop_class_uid == "1.2.3"


def test_header_from_compressed_file(tmp_path: Path) -> None:
    ds = dicomgen.image(dicomgen.StudyIds())
    path = dicomgen.save(ds, tmp_path / "jls.dcm", JPEGLSLossless)
    header = header_from_file(path)
    assert header.transfer_syntax_uid == JPEGLSLossless
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert source_ae_of_file(path) is None


def test_not_dicom_file(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"hello")
    with pytest.raises(InvalidInstanceError, match="not a readable DICOM file"):
        header_from_file(path)
