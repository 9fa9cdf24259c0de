"""A seeded corpus of malformed DICOM instances, as Part 10 files whose file meta stays valid (so a C-STORE SCU
sends them) while the dataset is broken in one of the ways real senders and attackers break it.

Each file is named ``<index>-<kind>.dcm``; ``generate`` returns the paths. The same seed gives the same bytes.
"""

from __future__ import annotations

import random
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom.dsutils import split_dataset

from tests import dicomgen

Mutation = Callable[[random.Random, Dataset, Path], Path]


def _base(rng: random.Random, ids: dicomgen.StudyIds) -> Dataset:
    return dicomgen.image(ids, rows=rng.choice([32, 48, 64]), columns=rng.choice([32, 48, 64]), seed=rng.randrange(9))


def _rewrite(path: Path, change: Callable[[bytes], bytes]) -> Path:
    """Apply ``change`` to the dataset bytes after the (kept) file meta."""
    _, offset = split_dataset(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:offset] + change(raw[offset:]))
    return path


def truncated(rng: random.Random, ds: Dataset, path: Path) -> Path:
    dicomgen.save(ds, path)
    return _rewrite(path, lambda body: body[: rng.randrange(1, max(2, len(body) - 1))])


def flipped_bytes(rng: random.Random, ds: Dataset, path: Path) -> Path:
    dicomgen.save(ds, path)

    def flip(body: bytes) -> bytes:
        data = bytearray(body)
        header = min(len(data), 600)  # where the elements are, before the pixels
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(header)] = rng.randrange(256)
        return bytes(data)

    return _rewrite(path, flip)


def unknown_vr(rng: random.Random, ds: Dataset, path: Path) -> Path:
    """One element's two VR bytes replaced (explicit VR): an unknown VR, or one its length does not fit."""
    keyword = rng.choice(["Modality", "SeriesNumber", "Rows", "BodyPartExamined", "PatientName", "StudyID"])
    element = ds.data_element(keyword)
    assert element is not None
    needle = struct.pack("<HH", element.tag.group, element.tag.element)
    vr = rng.choice([b"ZZ", b"\x00\x00", b"OB", b"SQ", b"FD", b"UN"])
    dicomgen.save(ds, path)

    def replace(body: bytes) -> bytes:
        at = body.find(needle)
        return body if at < 0 else body[: at + 4] + vr + body[at + 6 :]

    return _rewrite(path, replace)


def absurd_dimensions(rng: random.Random, ds: Dataset, path: Path) -> Path:
    choice = rng.randrange(7)
    if choice == 0:
        ds.Rows = ds.Columns = 65535  # a header claiming 8 GB with a few KB behind it
    elif choice == 1:
        ds.Rows = 0
    elif choice == 2:
        ds.BitsAllocated = rng.choice([0, 7, 64])
    elif choice == 3:
        ds.BitsStored = 40
    elif choice == 4:
        ds.NumberOfFrames = rng.choice([100000, 0, -1])
    elif choice == 5:
        ds.SamplesPerPixel = 3  # with a MONOCHROME2 interpretation and one sample's bytes
    else:
        ds.PhotometricInterpretation = rng.choice(["PALETTE COLOR", "YBR_FULL", "", "NONSENSE"])
    return dicomgen.save(ds, path)


def wrong_pixel_length(rng: random.Random, ds: Dataset, path: Path) -> Path:
    pixels = bytes(ds.PixelData)
    cut = rng.choice([len(pixels) // 2, len(pixels) - 2, 1, 0])
    ds.PixelData = pixels[:cut] if rng.random() < 0.7 else pixels + pixels
    return dicomgen.save(ds, path)


def broken_compressed(rng: random.Random, ds: Dataset, path: Path) -> Path:
    syntax: UID = rng.choice([RLELossless, JPEG2000Lossless])
    if rng.random() < 0.5:
        fragment = bytes(rng.randrange(256) for _ in range(rng.randrange(16, 400)))
    else:  # a real stream, cut short and corrupted
        stream = next(generate_frames(dcmread(dicomgen.save(ds, path, syntax)).PixelData, number_of_frames=1))
        cut = bytearray(stream[: max(8, len(stream) // rng.randint(2, 5))])
        cut[rng.randrange(len(cut))] ^= 0xFF
        fragment = bytes(cut)
    if len(fragment) % 2:
        fragment += b"\x00"
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _save_as_is(ds, path, syntax)


def bad_uids(rng: random.Random, ds: Dataset, path: Path) -> Path:
    keyword = rng.choice(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    choice = rng.randrange(5)
    meta_uid = str(ds.SOPInstanceUID)
    if choice == 0:
        delattr(ds, keyword)
    elif choice == 1:
        setattr(ds, keyword, "")
    elif choice == 2:
        setattr(ds, keyword, f"1.2.826.0.1.3680043.8.498.{rng.randrange(10**59, 10**60)}")  # 86 characters
    elif choice == 3:
        setattr(ds, keyword, f"not-a-uid-{rng.randrange(10**9)} ÄÖ")
    else:
        setattr(ds, keyword, [str(generate_uid()), str(generate_uid())])  # multi-valued
    return _save_as_is(ds, path, meta_uid=meta_uid)


def huge_private(rng: random.Random, ds: Dataset, path: Path) -> Path:
    block = ds.private_block(0x0099, "FRACWATCH FUZZ", create=True)
    if rng.random() < 0.5:
        block.add_new(0x01, "OB", bytes(rng.randrange(1, 4) * 1_000_000))  # 1-3 MB of private bytes
    else:
        for index in range(0x10, 0xFF):
            block.add_new(index, "LO", "x" * 64)
        ds.add_new(0x00990010 + 1, "LO", "SECOND CREATOR")
    return dicomgen.save(ds, path)


def wrong_transfer_syntax(rng: random.Random, ds: Dataset, path: Path) -> Path:
    """Encoded explicit VR little endian, native pixels, under a file meta (and so a presentation context)
    claiming another transfer syntax."""
    claimed = rng.choice([ImplicitVRLittleEndian, ExplicitVRBigEndian, JPEG2000Lossless, RLELossless])
    dicomgen.save(ds, path)
    meta, offset = split_dataset(path)
    meta.TransferSyntaxUID = claimed
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + path.read_bytes()[offset:])
    return path


MUTATIONS: dict[str, tuple[Mutation, int]] = {
    "truncated": (truncated, 40),
    "flipped": (flipped_bytes, 60),
    "unknown-vr": (unknown_vr, 40),
    "dimensions": (absurd_dimensions, 40),
    "pixel-length": (wrong_pixel_length, 30),
    "compressed": (broken_compressed, 30),
    "uids": (bad_uids, 40),
    "private": (huge_private, 20),
    "syntax": (wrong_transfer_syntax, 20),
}


def generate(directory: Path, seed: int = 35) -> list[Path]:
    """The corpus (320 files), four instances to a study where their UIDs survive the mutation."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    ids = dicomgen.StudyIds(accession="FUZZ")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each invalid value it is asked to write: the point
        for kind, (mutate, count) in MUTATIONS.items():
            for _ in range(count):
                if len(paths) % 4 == 0:
                    ids = dicomgen.StudyIds(accession=f"FUZZ-{len(paths) // 4}")
                paths.append(mutate(rng, _base(rng, ids), directory / f"{len(paths):03d}-{kind}.dcm"))
    return paths


# --- writing files pydicom would refuse to write as they are -------------------------------------------------


def _save_as_is(ds: Dataset, path: Path, syntax: UID = ExplicitVRLittleEndian, meta_uid: str | None = None) -> Path:
    """Write ``ds`` as it is (explicit VR little endian encoding) with a valid file meta: ``syntax``, and the SOP
    Instance UID ``meta_uid`` or the dataset's."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = meta_uid or str(ds.get("SOPInstanceUID", "") or generate_uid())
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128  # written as a Part 10 file (preamble, DICM, file meta), whatever the elements
    dcmwrite(path, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return path
