"""Generate real DICOM files for tests: DX, CR, SR, compressed images, all with a synthetic patient."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")


@dataclass
class StudyIds:
    """UIDs and non-PHI identifiers of one synthetic study."""

    study_uid: str = field(default_factory=lambda: str(generate_uid()))
    accession: str = "ACC0001"
    patient_name: str = "Doe^Jane"
    patient_id: str = "PAT-SECRET-42"


def _base(ids: StudyIds, sop_class: UID, modality: str, series_uid: str, series_number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = ids.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.AccessionNumber = ids.accession
    ds.PatientName = ids.patient_name
    ds.PatientID = ids.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20261122"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    return ds


def image(
    ids: StudyIds,
    *,
    modality: str = "DX",
    sop_class: UID = DX_PRESENTATION,
    series_uid: str | None = None,
    series_number: int = 1,
    rows: int = 128,
    columns: int = 96,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    body_part: str = "CHEST",
    seed: int = 0,
) -> Dataset:
    """A radiograph-like image with noise; 16-bit storage."""
    ds = _base(ids, sop_class, modality, series_uid or str(generate_uid()), series_number)
    ds.BodyPartExamined = body_part
    ds.ImageLaterality = "L"
    ds.PatientOrientation = ["A", "F"]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.Manufacturer = "Test Modality Inc"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 2**bits_stored, size=(rows, columns), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def basic_text_sr(ids: StudyIds, series_number: int = 99) -> Dataset:
    """A small Basic Text SR in the study."""
    ds = _base(ids, BASIC_TEXT_SR, "SR", str(generate_uid()), series_number)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue = "18748-4"
    concept.CodingSchemeDesignator = "LN"
    concept.CodeMeaning = "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = Sequence([concept])
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentDate = "20261122"
    ds.ContentTime = "101500"
    return ds


def save(ds: Dataset, path: Path, transfer_syntax: UID = ExplicitVRLittleEndian) -> Path:
    """Write ``ds`` as a Part 10 file, compressing the pixels when ``transfer_syntax`` is compressed."""
    ds = copy.deepcopy(ds)  # compress() rewrites the PixelData element in place
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if transfer_syntax.is_compressed:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(transfer_syntax, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def phantom_image(ids: StudyIds, seed: int, fractured: bool, series_uid: str | None = None) -> Dataset:
    """A DX image of a procedural limb phantom (fractured or not): the shipped model scores these apart."""
    from fracwatch.synth.phantom import render_phantom, to_stored

    picture = render_phantom(seed, fractured).image
    ds = image(ids, rows=picture.shape[0], columns=picture.shape[1], series_uid=series_uid, seed=seed)
    ds.PixelData = to_stored(picture).tobytes()
    return ds
