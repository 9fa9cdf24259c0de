"""Synthetic images as DICOM DX (For Presentation) studies of synthetic patients, ready to send to the daemon."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from fracwatch import __version__

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
BODY_PART = {"rib": "CHEST", "clavicle": "CLAVICLE", "humerus": "SHOULDER", "scapula": "SHOULDER", "none": "CHEST"}


def _uid(seed: int, *parts: object) -> UID:
    return UID(generate_uid(entropy_srcs=["fracwatch-synth", str(seed), *map(str, parts)]))


def write_dx(
    folder: Path, name: str, stored: np.ndarray, photometric: str, record: dict[str, object], seed: int
) -> dict[str, str]:
    """One DX image as its own study (patient = the pose); return the manifest fields it fills."""
    pose, index = record["pose"], record["index"]
    study_uid = _uid(seed, "study", pose, index)
    sop_uid = _uid(seed, "sop", pose, index)
    when = datetime(2026, 1, 1, 8, 0, tzinfo=UTC) + timedelta(minutes=int(str(pose)) * 97 + int(str(index)))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = DX_FOR_PRESENTATION, sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"SYNTHETIC^POSE{int(str(pose)):04d}"
    ds.PatientID = f"SYN{int(str(pose)):06d}"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, _uid(seed, "series", pose, index)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber = f"SYN{int(str(pose)):04d}{int(str(index)):02d}"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC DRR - NOT A PATIENT"
    ds.Modality = "DX"
    ds.Manufacturer = "fracwatch-synth"
    ds.SoftwareVersions = __version__
    ds.BodyPartExamined = BODY_PART.get(str(record["bone_class"]), "CHEST")
    ds.ViewPosition = str(record["view"]) if record["view"] in ("AP", "PA") else ""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.BurnedInAnnotation = "NO"
    spacing = float(str(record["pixel_spacing_mm"]))
    ds.ImagerPixelSpacing = ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.LossyImageCompression = "00"
    ds.PixelData = stored.astype("<u2").tobytes()
    target = folder / ds.PatientID / f"{name}.dcm"
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return {
        "dicom": str(target.relative_to(folder.parent)),
        "study_instance_uid": study_uid,
        "sop_instance_uid": sop_uid,
    }
