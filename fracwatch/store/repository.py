"""Queries and units of work on the result database. Callers own the session and its transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Table, bindparam, func, insert, select, update
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
    if modality in values:
        return current
    values.add(modality)
    return "\\".join(sorted(values))[:64]


_STUDIES: Table = Study.__table__  # type: ignore[assignment]
_SERIES: Table = Series.__table__  # type: ignore[assignment]
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]

# Statements of the per-image hot path, built once: values arrive as bound parameters, so each execution
# skips statement construction and hits SQLAlchemy's compiled cache.
_SELECT_INSTANCE_VERSION = select(_INSTANCES.c.study_version).where(
    _INSTANCES.c.sop_instance_uid == bindparam("sop_instance_uid")
)
_SELECT_STUDY = (
    select(
        _STUDIES.c.id,
        _STUDIES.c.state,
        _STUDIES.c.version,
        _STUDIES.c.last_received_at,
        _STUDIES.c.modality,
        _STUDIES.c.body_part,
        _STUDIES.c.accession_number,
    )
    .where(_STUDIES.c.study_instance_uid == bindparam("study_instance_uid"))
    .with_for_update()
)
_INSERT_STUDY = insert(_STUDIES).returning(_STUDIES.c.id)
_UPDATE_STUDY = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("study_id"))
    .values(
        last_received_at=bindparam("new_last_received_at"),
        sending_ae=bindparam("new_sending_ae"),
        modality=bindparam("new_modality"),
        body_part=bindparam("new_body_part"),
        accession_number=bindparam("new_accession_number"),
    )
)
_REOPEN_STUDY = _UPDATE_STUDY.values(
    state=StudyState.RECEIVING.value, version=bindparam("new_version"), completed_at=None, ready_at=None
)
_SELECT_SERIES = select(_SERIES.c.id).where(_SERIES.c.series_instance_uid == bindparam("series_instance_uid"))
_INSERT_SERIES = insert(_SERIES).returning(_SERIES.c.id)
_INSERT_INSTANCE = insert(_INSTANCES)


def _study_id(session: Session, received: ReceivedInstance) -> tuple[int, bool, int]:
    """Create or update the study row for ``received``; return (id, re-opened, version)."""
    header = received.header
    row = session.execute(_SELECT_STUDY, {"study_instance_uid": header.study_instance_uid}).first()
    if row is None:
        study_id = session.execute(
            _INSERT_STUDY,
            {
                "study_instance_uid": header.study_instance_uid,
                "accession_number": header.accession_number,
                "modality": header.modality,
                "body_part": header.body_part,
                "sending_ae": received.calling_ae,
                "first_received_at": received.received_at,
                "last_received_at": received.received_at,
                "state": StudyState.RECEIVING.value,
                "version": 1,
            },
        ).scalar_one()
        return int(study_id), False, 1
    reopened = row.state != StudyState.RECEIVING.value
    version = row.version + 1 if reopened else row.version
    session.execute(
        _REOPEN_STUDY if reopened else _UPDATE_STUDY,
        {
            "study_id": row.id,
            "new_last_received_at": max(row.last_received_at, received.received_at),
            "new_sending_ae": received.calling_ae,
            "new_modality": _merge_modalities(row.modality, header.modality),
            "new_body_part": row.body_part or header.body_part,
            "new_accession_number": row.accession_number or header.accession_number,
            "new_version": version,
        },
    )
    return int(row.id), reopened, version


def _series_id(session: Session, study_id: int, received: ReceivedInstance) -> int:
    header = received.header
    series_id = session.execute(_SELECT_SERIES, {"series_instance_uid": header.series_instance_uid}).scalar()
    if series_id is not None:
        return int(series_id)
    return int(
        session.execute(
            _INSERT_SERIES,
            {
                "study_id": study_id,
                "series_instance_uid": header.series_instance_uid,
                "modality": header.modality,
                "body_part": header.body_part,
                "series_number": header.series_number,
                "first_received_at": received.received_at,
            },
        ).scalar_one()
    )


def record_instance(session: Session, received: ReceivedInstance) -> RecordOutcome:
    """Record a spooled instance, creating its study and series and re-opening a handed-over study.

    A SOP Instance UID already held changes nothing (a resend) and returns ``created=False``. Written with
    Core statements: this runs once per received image, on the association thread, before the C-STORE answer.
    """
    header = received.header
    existing_version = session.execute(_SELECT_INSTANCE_VERSION, {"sop_instance_uid": header.sop_instance_uid}).scalar()
    if existing_version is not None:
        return RecordOutcome(created=False, study_version=int(existing_version), reopened=False)
    study_id, reopened, version = _study_id(session, received)
    series_id = _series_id(session, study_id, received)
    session.execute(
        _INSERT_INSTANCE,
        {
            "study_id": study_id,
            "series_id": series_id,
            "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "laterality": header.laterality,
            "path": str(received.path),
            "size_bytes": received.size_bytes,
            "received_at": received.received_at,
            "calling_ae": received.calling_ae,
            "study_version": version,
            "state": InstanceState.STORED.value,
            "error": None,
        },
    )
    return RecordOutcome(created=True, study_version=version, reopened=reopened)


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
