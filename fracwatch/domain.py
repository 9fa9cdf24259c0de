"""Small value types shared by the layers; imports nothing of ours."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path


class StudyState(enum.StrEnum):
    """Where a study is in its lifecycle.

    ``receiving`` until ``stable_after`` seconds pass without a new instance, then ``complete`` (handed to
    the work queue), then ``ready`` once the worker has taken it. A new instance after hand-over re-opens
    the study (``receiving`` again, version + 1).
    """

    RECEIVING = "receiving"
    COMPLETE = "complete"
    READY = "ready"  # taken by the worker
    SCORED = "scored"  # a result (and an SR when any image scored) exists for this version
    SKIPPED = "skipped"  # nothing scorable in the study (e.g. only documents)
    FAILED = "failed"  # its scoring job failed every attempt (dead-lettered, with the reason); re-queue by hand


class InstanceState(enum.StrEnum):
    """State of one stored instance."""

    STORED = "stored"
    ERROR = "error"
    PURGED = "purged"


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The identifying, non-PHI attributes of one received instance, read from its header."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None = None
    body_part: str | None = None
    accession_number: str | None = None
    series_number: int | None = None
    laterality: str | None = None
    manufacturer: str | None = None


@dataclass(frozen=True, slots=True)
class ReceivedInstance:
    """An instance written durably to the spool, ready to be recorded in the database."""

    header: InstanceHeader
    path: Path
    size_bytes: int
    calling_ae: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    """What recording an instance did to its study."""

    created: bool  # False: the SOP Instance UID was already held (a resend)
    study_version: int
    reopened: bool  # True: the study had been handed over and is receiving again


CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    }
)
RADIOGRAPH_CLASSES = frozenset({CR_IMAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING})
OUR_MANUFACTURER = "fracwatch"


def is_scorable(header: InstanceHeader) -> bool:
    """Whether an instance is a radiograph fracwatch scores.

    CR, DX (for presentation and for processing), and Secondary Capture whose Modality is CR or DX; never an
    object fracwatch produced (its SC overlays carry our manufacturer). SR, PR, KOS and every other class are
    stored but not scored, and do not re-open a study that was already handed over.
    """
    if (header.manufacturer or "").strip().lower() == OUR_MANUFACTURER:
        return False
    if header.sop_class_uid in RADIOGRAPH_CLASSES:
        return True
    return header.sop_class_uid in SECONDARY_CAPTURE_CLASSES and (header.modality or "").upper() in ("CR", "DX")


def parse_time_bound(text: str) -> datetime:
    """A query's date bound (``since`` / ``until``, CLI and API alike) as an aware UTC datetime.

    An ISO 8601 date is its midnight UTC; a date-time without an offset is UTC. Bounds are half-open:
    ``since`` includes its instant, ``until`` excludes it, so ``--since 2026-11-21 --until 2026-11-22`` is the
    whole of 21 November. Raises ValueError for anything else.
    """
    value = text.strip()
    if len(value) == 10:
        moment = datetime.combine(date.fromisoformat(value), time.min)
    else:
        moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-12:00 is past the last datetime in UTC
        raise ValueError(f"{text!r} is out of range in UTC") from None
