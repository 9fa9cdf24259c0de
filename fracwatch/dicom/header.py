"""Read the identifying attributes of an instance from its header, never touching the pixel data."""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from fracwatch.domain import InstanceHeader
from fracwatch.errors import InvalidInstanceError

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float and Pixel Data
_DEFER = 4096  # bytes: larger values are not read into memory (overlays, private blobs)


def _at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in PIXEL_TAGS


def header_from_stream(stream: BinaryIO, transfer_syntax_uid: str, sop_class_uid: str | None = None) -> InstanceHeader:
    """Parse the dataset ``stream`` (no file meta) encoded with ``transfer_syntax_uid``.

    ``sop_class_uid`` (from the DIMSE request) is used when the dataset lacks one. Raises
    :class:`InvalidInstanceError` naming what is wrong.
    """
    syntax = UID(transfer_syntax_uid)
    try:
        if syntax == DeflatedExplicitVRLittleEndian:
            stream = io.BytesIO(zlib.decompress(stream.read(), -zlib.MAX_WBITS))
        ds = read_dataset(
            stream,
            is_implicit_VR=syntax.is_implicit_VR,
            is_little_endian=syntax.is_little_endian,
            stop_when=_at_pixels,
            defer_size=_DEFER,
        )
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InvalidInstanceError(f"dataset cannot be parsed: {exc}") from exc
    return header_from_dataset(ds, transfer_syntax_uid, sop_class_uid)


def header_from_file(path: Path) -> InstanceHeader:
    """Parse the header of the Part 10 file at ``path``."""
    try:
        ds = dcmread(path, stop_before_pixels=True, defer_size=_DEFER)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InvalidInstanceError(f"{path.name} is not a readable DICOM file: {exc}") from exc
    syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
    if not syntax:
        raise InvalidInstanceError(f"{path.name} has no Transfer Syntax UID in its file meta")
    media_class = getattr(ds.file_meta, "MediaStorageSOPClassUID", None)
    return header_from_dataset(ds, str(syntax), str(media_class) if media_class else None)


MAX_UID = 64  # PS3.5 9.1: a UID is at most 64 characters


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed optional attribute (unknown VR, bad length) must not reject the image
        return None
    if value is None or value == "":
        return None
    text = str(value).strip()
    return text[:64] or None


def _uid(ds: Dataset, keyword: str) -> str:
    """An identifying UID exactly as sent, or InvalidInstanceError (answered 0xC210): never cut or merged."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # unknown VR, undecodable value
        raise InvalidInstanceError(f"{keyword} cannot be read: {exc}") from exc
    if isinstance(value, MultiValue):
        raise InvalidInstanceError(f"{keyword} has {len(value)} values; a UID has one")
    text = str(value).strip(" \x00") if value is not None else ""
    if not text:
        raise InvalidInstanceError(f"dataset has no {keyword}")
    if len(text) > MAX_UID:
        raise InvalidInstanceError(f"{keyword} is {len(text)} characters long; a UID has at most {MAX_UID}")
    return text


def _series_number(ds: Dataset) -> int | None:
    try:
        raw = ds.get("SeriesNumber")
        return int(raw) if raw not in (None, "") else None
    except Exception:  # optional: an unknown VR or a non-number leaves it unknown
        return None


def header_from_dataset(ds: Dataset, transfer_syntax_uid: str, sop_class_uid: str | None = None) -> InstanceHeader:
    """Build an :class:`InstanceHeader` from an already parsed dataset."""
    sop_class = _text(ds, "SOPClassUID") or sop_class_uid
    if not sop_class:
        raise InvalidInstanceError("dataset has no SOPClassUID")
    try:
        return _header(ds, transfer_syntax_uid, sop_class)
    except InvalidInstanceError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed input: all of them mean 0xC210
        raise InvalidInstanceError(f"dataset header cannot be read: {exc}") from exc


def _header(ds: Dataset, transfer_syntax_uid: str, sop_class: str) -> InstanceHeader:
    return InstanceHeader(
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax_uid,
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        accession_number=_text(ds, "AccessionNumber"),
        series_number=_series_number(ds),
        laterality=_text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        manufacturer=_text(ds, "Manufacturer"),
    )


def source_ae_of_file(path: Path) -> str | None:
    """The Source Application Entity Title the file meta names (the AE that sent it), if any."""
    try:
        meta = read_file_meta_info(path)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    value = meta.get("SourceApplicationEntityTitle")
    return str(value).strip() or None if value else None
