"""Queries and units of work on the result database. Callers own the session and its transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from fracwatch.domain import InstanceState, ReceivedInstance, RecordOutcome, StudyState
from fracwatch.store.models import (
    Delivery,
    ImageResult,
    Instance,
    ProducedObject,
    Series,
    Study,
    StudyResult,
)


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


def pending_hand_overs(session: Session) -> list[HandOver]:
    """Studies marked complete but not yet taken by the worker (e.g. queued when the process stopped)."""
    rows = session.execute(
        select(Study.study_instance_uid, Study.version)
        .where(Study.state == StudyState.COMPLETE.value)
        .order_by(Study.completed_at)
    ).all()
    return [HandOver(uid, version) for uid, version in rows]


def _advance(session: Session, hand_over: HandOver, current: StudyState, target: StudyState, **values: object) -> bool:
    """Move the study from ``current`` to ``target`` if it is still at the handed-over version.

    The conditional UPDATE is what keeps every transition safe against a concurrent re-open.
    """
    result = session.execute(
        update(Study)
        .where(
            Study.study_instance_uid == hand_over.study_instance_uid,
            Study.version == hand_over.version,
            Study.state == current.value,
        )
        .values(state=target.value, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def mark_ready(session: Session, hand_over: HandOver, now: datetime) -> bool:
    """Mark the study version ready; False if it re-opened meanwhile (a newer version will come)."""
    return _advance(session, hand_over, StudyState.COMPLETE, StudyState.READY, ready_at=now)


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


# --- scoring ---------------------------------------------------------------------------------------------


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


def latest_report(session: Session, study_instance_uid: str) -> ProducedObject | None:
    """The most recent SR fracwatch produced for the study, if any."""
    return session.scalars(
        select(ProducedObject)
        .join(StudyResult, StudyResult.id == ProducedObject.study_result_id)
        .join(Study, Study.id == StudyResult.study_id)
        .where(Study.study_instance_uid == study_instance_uid, ProducedObject.kind == "sr")
        .order_by(ProducedObject.id.desc())
    ).first()


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
        produced.deliveries = [_pending_delivery(destination, result.scored_at) for destination in result.destinations]
        session.add(produced)
        session.flush()  # ids in creation order: the SR is delivered before its overlays
    _advance(session, HandOver(result.study_instance_uid, result.study_version), StudyState.READY, StudyState.SCORED)
    return row.id


def mark_skipped(session: Session, hand_over: HandOver) -> None:
    """Nothing scorable in the study version."""
    _advance(session, hand_over, StudyState.READY, StudyState.SKIPPED)


# --- the outbox -----------------------------------------------------------------------------------------


def _pending_delivery(destination: str, now: datetime) -> Delivery:
    """A new outbox row, due now."""
    return Delivery(destination=destination, state="pending", attempts=0, next_attempt_at=now, created_at=now)


@dataclass(frozen=True)
class DeliveryJob:
    """One pending delivery, as the sender needs it."""

    id: int
    destination: str
    path: str
    sop_instance_uid: str
    sop_class_uid: str
    attempts: int
    created_at: datetime


def due_deliveries(session: Session, now: datetime, limit: int = 100) -> list[DeliveryJob]:
    """Pending deliveries whose next attempt is due, oldest first."""
    rows = session.execute(
        select(
            Delivery.id,
            Delivery.destination,
            ProducedObject.path,
            ProducedObject.sop_instance_uid,
            ProducedObject.sop_class_uid,
            Delivery.attempts,
            Delivery.created_at,
        )
        .join(ProducedObject, ProducedObject.id == Delivery.produced_object_id)
        .where(Delivery.state == "pending", Delivery.next_attempt_at <= now)
        .order_by(Delivery.next_attempt_at, Delivery.id)
        .limit(limit)
    ).all()
    return [DeliveryJob(*row) for row in rows]


def mark_sent(session: Session, delivery_id: int, status: int, now: datetime) -> None:
    """The destination acknowledged: never send this object there again."""
    delivery = session.get(Delivery, delivery_id)
    if delivery is None or delivery.state == "sent":
        return
    delivery.state = "sent"
    delivery.sent_at = now
    delivery.last_status = status
    delivery.last_error = None
    delivery.attempts += 1
    result = session.get(StudyResult, delivery.produced_object.study_result_id)
    if result is not None and result.delivered_at is None:
        result.delivered_at = now


def mark_failed(
    session: Session, delivery_id: int, status: int | None, error: str, next_attempt_at: datetime | None
) -> int:
    """Record a failed attempt: retry at ``next_attempt_at``, or dead letter when it is None. Returns attempts."""
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        return 0
    delivery.attempts += 1
    delivery.last_status = status
    delivery.last_error = error[:2000]
    if next_attempt_at is None:
        delivery.state = "dead"
        delivery.next_attempt_at = None
    else:
        delivery.next_attempt_at = next_attempt_at
    return delivery.attempts


@dataclass(frozen=True)
class DeliverySummary:
    """One row of ``fracwatch outbox``."""

    id: int
    study_instance_uid: str
    sop_instance_uid: str
    kind: str
    destination: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


def list_deliveries(session: Session, states: Sequence[str], limit: int = 200) -> list[DeliverySummary]:
    """Deliveries in ``states``, newest first."""
    rows = session.execute(
        select(Delivery, ProducedObject, Study.study_instance_uid)
        .join(ProducedObject, ProducedObject.id == Delivery.produced_object_id)
        .join(StudyResult, StudyResult.id == ProducedObject.study_result_id)
        .join(Study, Study.id == StudyResult.study_id)
        .where(Delivery.state.in_(list(states)))
        .order_by(Delivery.id.desc())
        .limit(limit)
    ).all()
    return [
        DeliverySummary(
            id=d.id,
            study_instance_uid=uid,
            sop_instance_uid=p.sop_instance_uid,
            kind=p.kind,
            destination=d.destination,
            state=d.state,
            attempts=d.attempts,
            next_attempt_at=d.next_attempt_at,
            last_status=d.last_status,
            last_error=d.last_error,
            created_at=d.created_at,
            sent_at=d.sent_at,
        )
        for d, p, uid in rows
    ]


@dataclass(frozen=True)
class ResendOutcome:
    """What ``fracwatch resend`` did."""

    requeued: int
    already_acknowledged: int
    added: int


def requeue_study(
    session: Session, study_instance_uid: str, destinations: Sequence[str], now: datetime
) -> ResendOutcome:
    """Send the study's latest SR again to every destination that has not acknowledged it.

    Dead or pending deliveries are re-armed (attempts reset); destinations configured since are added;
    destinations that acknowledged the SR are left alone — an acknowledged object is never sent twice.
    """
    produced = latest_report(session, study_instance_uid)
    if produced is None:
        raise LookupError(f"study {study_instance_uid} has no fracwatch report")
    requeued = acknowledged = added = 0
    seen = set()
    for delivery in produced.deliveries:
        seen.add(delivery.destination)
        if delivery.state == "sent":
            acknowledged += 1
            continue
        delivery.state = "pending"
        delivery.attempts = 0
        delivery.next_attempt_at = now
        requeued += 1
    for destination in destinations:
        if destination not in seen:
            produced.deliveries.append(_pending_delivery(destination, now))
            added += 1
    return ResendOutcome(requeued, acknowledged, added)


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
    result_version: int, study_version: int, last_received_at: datetime, completed_at: datetime | None, end: datetime
) -> float | None:
    """Seconds from the result's last received instance to ``end`` (acknowledgement, else scoring).

    The study row only knows its latest version's last instance; an older version's result falls back to
    its completion time.
    """
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
