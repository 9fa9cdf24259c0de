"""Queries and units of work on the result database. Callers own the session and its transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from fracwatch.domain import InstanceState, ReceivedInstance, RecordOutcome, StudyState
from fracwatch.store.models import Instance, Series, Study


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    """The instance row with this SOP Instance UID, if held."""
    return session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).first()


def _merge_modalities(current: str | None, modality: str | None) -> str | None:
    if not modality:
        return current
    values = set(current.split("\\")) if current else set()
    values.add(modality)
    return "\\".join(sorted(values))[:64]


def _get_or_create_study(session: Session, received: ReceivedInstance) -> Study:
    header = received.header
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == header.study_instance_uid).with_for_update()
    ).first()
    if study is None:
        study = Study(
            study_instance_uid=header.study_instance_uid,
            accession_number=header.accession_number,
            first_received_at=received.received_at,
            last_received_at=received.received_at,
            state=StudyState.RECEIVING.value,
            version=1,
        )
        session.add(study)
    return study


def _get_or_create_series(session: Session, study: Study, received: ReceivedInstance) -> Series:
    header = received.header
    series = session.scalars(select(Series).where(Series.series_instance_uid == header.series_instance_uid)).first()
    if series is None:
        series = Series(
            study=study,
            series_instance_uid=header.series_instance_uid,
            modality=header.modality,
            body_part=header.body_part,
            series_number=header.series_number,
            first_received_at=received.received_at,
        )
        session.add(series)
    return series


def record_instance(session: Session, received: ReceivedInstance) -> RecordOutcome:
    """Record a spooled instance, creating its study and series and re-opening a handed-over study.

    A SOP Instance UID already held changes nothing (a resend) and returns ``created=False``.
    """
    header = received.header
    existing = find_instance(session, header.sop_instance_uid)
    if existing is not None:
        return RecordOutcome(created=False, study_version=existing.study_version, reopened=False)
    study = _get_or_create_study(session, received)
    reopened = False
    if study.state != StudyState.RECEIVING.value:
        study.version += 1
        study.state = StudyState.RECEIVING.value
        study.completed_at = None
        study.ready_at = None
        reopened = True
    study.last_received_at = max(study.last_received_at, received.received_at)
    study.sending_ae = received.calling_ae
    study.modality = _merge_modalities(study.modality, header.modality)
    study.body_part = study.body_part or header.body_part
    study.accession_number = study.accession_number or header.accession_number
    series = _get_or_create_series(session, study, received)
    session.add(
        Instance(
            study=study,
            series=series,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            laterality=header.laterality,
            path=str(received.path),
            size_bytes=received.size_bytes,
            received_at=received.received_at,
            calling_ae=received.calling_ae,
            study_version=study.version,
            state=InstanceState.STORED.value,
        )
    )
    session.flush()
    return RecordOutcome(created=True, study_version=study.version, reopened=reopened)


def held_paths(session: Session) -> set[str]:
    """The spool paths of every instance the database knows."""
    return set(session.scalars(select(Instance.path)))


@dataclass(frozen=True)
class HandOver:
    """A study version handed to the work queue."""

    study_instance_uid: str
    version: int


def complete_stable_studies(session: Session, now: datetime, stable_after: float) -> list[HandOver]:
    """Mark every receiving study quiet for ``stable_after`` seconds as complete; return them.

    The conditional UPDATE makes the transition safe against an instance arriving concurrently.
    """
    cutoff = now - timedelta(seconds=stable_after)
    candidates = session.execute(
        select(Study.id, Study.study_instance_uid, Study.version).where(
            Study.state == StudyState.RECEIVING.value, Study.last_received_at <= cutoff
        )
    ).all()
    handed: list[HandOver] = []
    for study_id, uid, version in candidates:
        result = session.execute(
            update(Study)
            .where(
                Study.id == study_id,
                Study.state == StudyState.RECEIVING.value,
                Study.version == version,
                Study.last_received_at <= cutoff,
            )
            .values(state=StudyState.COMPLETE.value, completed_at=now)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            handed.append(HandOver(uid, version))
    return handed


def pending_hand_overs(session: Session) -> list[HandOver]:
    """Studies marked complete but not yet taken by the worker (e.g. queued when the process stopped)."""
    rows = session.execute(
        select(Study.study_instance_uid, Study.version)
        .where(Study.state == StudyState.COMPLETE.value)
        .order_by(Study.completed_at)
    ).all()
    return [HandOver(uid, version) for uid, version in rows]


def mark_ready(session: Session, hand_over: HandOver, now: datetime) -> bool:
    """Mark the study version ready; False if it re-opened meanwhile (a newer version will come)."""
    result = session.execute(
        update(Study)
        .where(
            Study.study_instance_uid == hand_over.study_instance_uid,
            Study.version == hand_over.version,
            Study.state == StudyState.COMPLETE.value,
        )
        .values(state=StudyState.READY.value, ready_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class StudySummary:
    """One row of ``fracwatch studies``."""

    study_instance_uid: str
    accession_number: str | None
    modality: str | None
    body_part: str | None
    sending_ae: str | None
    state: str
    version: int
    instances: int
    series: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None


@dataclass(frozen=True)
class StudyFilter:
    """Filters of the study list; ``None`` means no filter."""

    received_since: datetime | None = None
    received_until: datetime | None = None
    state: str | None = None
    accession_number: str | None = None
    limit: int = 50


def list_studies(session: Session, filters: StudyFilter) -> Sequence[StudySummary]:
    """Recent studies, newest last-received first, with instance and series counts."""
    instance_count = (
        select(func.count(Instance.id)).where(Instance.study_id == Study.id).correlate(Study).scalar_subquery()
    )
    series_count = select(func.count(Series.id)).where(Series.study_id == Study.id).correlate(Study).scalar_subquery()
    query = select(Study, instance_count, series_count).order_by(Study.last_received_at.desc(), Study.id.desc())
    if filters.received_since is not None:
        query = query.where(Study.last_received_at >= filters.received_since)
    if filters.received_until is not None:
        query = query.where(Study.first_received_at < filters.received_until)
    if filters.state is not None:
        query = query.where(Study.state == filters.state)
    if filters.accession_number is not None:
        query = query.where(Study.accession_number == filters.accession_number)
    query = query.limit(filters.limit)
    return [
        StudySummary(
            study_instance_uid=study.study_instance_uid,
            accession_number=study.accession_number,
            modality=study.modality,
            body_part=study.body_part,
            sending_ae=study.sending_ae,
            state=study.state,
            version=study.version,
            instances=int(n_instances),
            series=int(n_series),
            first_received_at=study.first_received_at,
            last_received_at=study.last_received_at,
            completed_at=study.completed_at,
        )
        for study, n_instances, n_series in session.execute(query).all()
    ]
