"""Results: saving a scored study version with its image scores and produced objects, and listing them.

Callers own the session and its transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from fracwatch.domain import StudyState
from fracwatch.store.instances import HandOver, advance
from fracwatch.store.models import ImageResult, Instance, ProducedObject, Study, StudyResult
from fracwatch.store.outbox import new_delivery


@dataclass(frozen=True)
class ImageScore:
    """The outcome for one instance."""

    instance_id: int
    probability: float | None
    category: str | None
    error: str | None
    frames: int = 1


@dataclass(frozen=True)
class ReportFile:
    """An object fracwatch wrote to disk: the SR, an overlay (sc) or a key object selection (kos)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    path: str
    supersedes: str | None = None
    kind: str = "sr"


@dataclass(frozen=True)
class NewResult:
    """Everything the worker persists for one scored study version."""

    study_instance_uid: str
    study_version: int
    model_name: str
    model_version: str
    device_uid: str
    doubt_threshold: float
    positive_threshold: float
    probability: float | None
    category: str
    images: list[ImageScore]
    scored_at: datetime
    report: ReportFile | None
    destinations: list[str]
    attachments: list[ReportFile] = field(default_factory=list)  # overlays and KOS, sent after the SR


def save_result(session: Session, result: NewResult) -> int:
    """Persist a study result, its image results, the SR and its outbox rows; mark the study scored.

    The study's state changes only if it is still at the scored version (it may have re-opened meanwhile).
    """
    study = session.scalars(select(Study).where(Study.study_instance_uid == result.study_instance_uid)).one()
    row = StudyResult(
        study_id=study.id,
        study_version=result.study_version,
        model_name=result.model_name,
        model_version=result.model_version,
        device_uid=result.device_uid,
        doubt_threshold=result.doubt_threshold,
        positive_threshold=result.positive_threshold,
        probability=result.probability,
        category=result.category,
        images_scored=sum(1 for i in result.images if i.error is None),
        images_failed=sum(1 for i in result.images if i.error is not None),
        completed_at=study.completed_at,
        scored_at=result.scored_at,
        sr_sop_instance_uid=result.report.sop_instance_uid if result.report else None,
        supersedes_sop_instance_uid=result.report.supersedes if result.report else None,
    )
    row.images = [
        ImageResult(
            instance_id=image.instance_id,
            frames=image.frames,
            probability=image.probability,
            category=image.category,
            error=image.error,
        )
        for image in result.images
    ]
    session.add(row)
    session.flush()
    objects = ([result.report] if result.report is not None else []) + list(result.attachments)
    for item in objects:
        produced = ProducedObject(
            study_result_id=row.id,
            kind=item.kind,
            sop_class_uid=item.sop_class_uid,
            sop_instance_uid=item.sop_instance_uid,
            series_instance_uid=item.series_instance_uid,
            path=item.path,
            created_at=result.scored_at,
        )
        produced.deliveries = [new_delivery(destination, result.scored_at) for destination in result.destinations]
        session.add(produced)
        session.flush()  # ids in creation order: the SR is delivered before its overlays
    advance(session, HandOver(result.study_instance_uid, result.study_version), StudyState.READY, StudyState.SCORED)
    return row.id


@dataclass(frozen=True)
class Scored:
    """What a study version's scoring produced, for the metrics of the process that ran the job."""

    category: str
    images_scored: int
    seconds_since_complete: float | None


def scored_version(session: Session, study_instance_uid: str, version: int) -> Scored | None:
    """The newest result of this study version, if it was scored."""
    row = session.execute(
        select(StudyResult.category, StudyResult.images_scored, StudyResult.completed_at, StudyResult.scored_at)
        .join(Study, Study.id == StudyResult.study_id)
        .where(Study.study_instance_uid == study_instance_uid, StudyResult.study_version == version)
        .order_by(StudyResult.id.desc())
    ).first()
    if row is None:
        return None
    category, images, completed, scored = row
    latency = None if completed is None else max(0.0, (scored - completed).total_seconds())
    return Scored(category, images, latency)


@dataclass(frozen=True)
class ResultSummary:
    """One row of ``fracwatch results``."""

    study_instance_uid: str
    accession_number: str | None
    study_version: int
    category: str
    probability: float | None
    model_name: str
    model_version: str
    device_uid: str
    images_scored: int
    images_failed: int
    first_received_at: datetime
    completed_at: datetime | None
    scored_at: datetime
    delivered_at: datetime | None
    turnaround_seconds: float | None  # last instance received → first acknowledgement (or scoring)
    sr_sop_instance_uid: str | None


def turnaround_seconds(
    category: str,
    result_version: int,
    study_version: int,
    last_received_at: datetime,
    completed_at: datetime | None,
    end: datetime,
) -> float | None:
    """Seconds from the result's last received instance to ``end`` (acknowledgement, else scoring); None for an
    ``error`` result, which sends nothing to PACS (no SR, no flag).

    The study row only knows its latest version's last instance; an older version's result falls back to
    its completion time.
    """
    if category in ("error", "skipped"):
        return None
    start = last_received_at if study_version == result_version else completed_at
    return (end - start).total_seconds() if start is not None else None


@dataclass(frozen=True)
class ResultFilter:
    """Filters of the result list."""

    scored_since: datetime | None = None
    scored_until: datetime | None = None
    category: str | None = None
    accession_number: str | None = None
    study_instance_uid: str | None = None
    limit: int = 50


def list_results(session: Session, filters: ResultFilter) -> list[ResultSummary]:
    """Scored study versions, newest first."""
    query = (
        select(StudyResult, Study)
        .join(Study, Study.id == StudyResult.study_id)
        .order_by(StudyResult.scored_at.desc(), StudyResult.id.desc())
    )
    if filters.scored_since is not None:
        query = query.where(StudyResult.scored_at >= filters.scored_since)
    if filters.scored_until is not None:
        query = query.where(StudyResult.scored_at < filters.scored_until)
    if filters.category is not None:
        query = query.where(StudyResult.category == filters.category)
    if filters.accession_number is not None:
        query = query.where(Study.accession_number == filters.accession_number)
    if filters.study_instance_uid is not None:
        query = query.where(Study.study_instance_uid == filters.study_instance_uid)
    out = []
    for result, study in session.execute(query.limit(filters.limit)).all():
        out.append(
            ResultSummary(
                study_instance_uid=study.study_instance_uid,
                accession_number=study.accession_number,
                study_version=result.study_version,
                category=result.category,
                probability=result.probability,
                model_name=result.model_name,
                model_version=result.model_version,
                device_uid=result.device_uid,
                images_scored=result.images_scored,
                images_failed=result.images_failed,
                first_received_at=study.first_received_at,
                completed_at=result.completed_at,
                scored_at=result.scored_at,
                delivered_at=result.delivered_at,
                turnaround_seconds=turnaround_seconds(
                    result.category,
                    result.study_version,
                    study.version,
                    study.last_received_at,
                    result.completed_at,
                    result.delivered_at or result.scored_at,
                ),
                sr_sop_instance_uid=result.sr_sop_instance_uid,
            )
        )
    return out


def image_results(session: Session, study_instance_uid: str) -> list[tuple[str, float | None, str | None, str | None]]:
    """(SOP Instance UID, probability, category, error) of the study's latest result."""
    latest = session.scalars(
        select(StudyResult.id)
        .join(Study, Study.id == StudyResult.study_id)
        .where(Study.study_instance_uid == study_instance_uid)
        .order_by(StudyResult.id.desc())
    ).first()
    if latest is None:
        return []
    rows = session.execute(
        select(Instance.sop_instance_uid, ImageResult.probability, ImageResult.category, ImageResult.error)
        .join(Instance, Instance.id == ImageResult.instance_id)
        .where(ImageResult.study_result_id == latest)
        .order_by(ImageResult.id)
    ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]
