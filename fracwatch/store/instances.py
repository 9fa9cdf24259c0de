"""Instances and the study lifecycle: recording what arrives, completion, hand-over, the worker's claims.

Callers own the session and its transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Table, bindparam, insert, select, update
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


def _study_id(session: Session, received: ReceivedInstance, scorable: bool) -> tuple[int, bool, int]:
    """Create or update the study row for ``received``; return (id, re-opened, version).

    After hand-over only a new scorable image re-opens the study; anything else (an SR, ours or another's, a
    PR, a KOS) is recorded under the current version and leaves the study as it is.
    """
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
    handed_over = row.state != StudyState.RECEIVING.value
    if handed_over and not scorable:
        return int(row.id), False, int(row.version)
    reopened = handed_over
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


def record_instance(session: Session, received: ReceivedInstance, scorable: bool = True) -> RecordOutcome:
    """Record a spooled instance, creating its study and series and re-opening a handed-over study.

    A SOP Instance UID already held changes nothing (a resend) and returns ``created=False``. Written with
    Core statements: this runs once per received image, on the association thread, before the C-STORE answer.
    """
    header = received.header
    existing_version = session.execute(_SELECT_INSTANCE_VERSION, {"sop_instance_uid": header.sop_instance_uid}).scalar()
    if existing_version is not None:
        return RecordOutcome(created=False, study_version=int(existing_version), reopened=False)
    study_id, reopened, version = _study_id(session, received, scorable)
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
            "scorable": scorable,
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


def pending_hand_overs(session: Session, taken: bool = False) -> list[HandOver]:
    """Studies marked complete but not yet scored, oldest first; with ``taken`` also those a scoring job had
    claimed (``ready``) when its process died. Each is at most one job's work: re-deferring is idempotent."""
    states = [StudyState.COMPLETE.value] + ([StudyState.READY.value] if taken else [])
    rows = session.execute(
        select(Study.study_instance_uid, Study.version).where(Study.state.in_(states)).order_by(Study.completed_at)
    ).all()
    return [HandOver(uid, version) for uid, version in rows]


def advance(
    session: Session,
    hand_over: HandOver,
    current: StudyState | tuple[StudyState, ...],
    target: StudyState,
    **values: object,
) -> bool:
    """Move the study from ``current`` (a state, or any of several) to ``target`` if it is still at the
    handed-over version.

    The conditional UPDATE is what keeps every transition safe against a concurrent re-open.
    """
    states = [state.value for state in (current if isinstance(current, tuple) else (current,))]
    result = session.execute(
        update(Study)
        .where(
            Study.study_instance_uid == hand_over.study_instance_uid,
            Study.version == hand_over.version,
            Study.state.in_(states),
        )
        .values(state=target.value, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def mark_ready(session: Session, hand_over: HandOver, now: datetime) -> bool:
    """Mark the study version ready (taken by a scoring job); False if it re-opened meanwhile (a newer version
    will come) or is already scored. A version left ``ready`` by a job whose process died is taken again: the
    job queue's per-study lock means no other job holds it."""
    return advance(session, hand_over, (StudyState.COMPLETE, StudyState.READY), StudyState.READY, ready_at=now)


def dead_letter(session: Session, hand_over: HandOver, reason: str, now: datetime) -> bool:
    """Every attempt at scoring this version failed: state ``failed`` with the reason (False if it re-opened
    or was scored meanwhile)."""
    return advance(
        session,
        hand_over,
        (StudyState.COMPLETE, StudyState.READY),
        StudyState.FAILED,
        failed_at=now,
        failure_reason=reason[:2000],
    )


def requeue_failed(session: Session, study_instance_uid: str, now: datetime) -> HandOver | None:
    """Put a dead-lettered study back to ``complete`` (an admin fixed the cause); its hand-over, or None."""
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == study_instance_uid, Study.state == StudyState.FAILED.value)
    ).first()
    if study is None:
        return None
    study.state = StudyState.COMPLETE.value
    study.completed_at = now
    study.failed_at = None
    study.failure_reason = None
    return HandOver(study.study_instance_uid, study.version)


@dataclass(frozen=True)
class InstanceRef:
    """A stored instance the worker may score."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    path: str


def scorable_instances(session: Session, study_instance_uid: str) -> list[InstanceRef]:
    """Every stored, scorable instance of the study (all versions: a re-opened study is scored whole)."""
    rows = session.execute(
        select(Instance.id, Instance.sop_instance_uid, Instance.sop_class_uid, Instance.path)
        .join(Study, Study.id == Instance.study_id)
        .where(
            Study.study_instance_uid == study_instance_uid,
            Instance.scorable.is_(True),
            Instance.state == InstanceState.STORED.value,
        )
        .order_by(Instance.id)
    ).all()
    return [InstanceRef(*row) for row in rows]


def mark_skipped(session: Session, hand_over: HandOver) -> None:
    """Nothing scorable in the study version."""
    advance(session, hand_over, StudyState.READY, StudyState.SKIPPED)
