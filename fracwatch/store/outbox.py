"""The outbox: everything fracwatch sends and has not yet been acknowledged for, in one place.

Two kinds of row share one life — ``pending`` (due at ``next_attempt_at``) → ``sent`` once acknowledged, or
``dead`` after a permanent rejection or too many attempts — and one pair of helpers records each attempt:
:class:`Delivery` (a produced DICOM object to a destination AE) and :class:`TriageMessage` (a worklist flag to an
HL7 or webhook receiver). Callers own the session and its transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fracwatch.store.models import Delivery, Instance, ProducedObject, Study, StudyResult, TriageMessage

PENDING, SENT, DEAD = "pending", "sent", "dead"
ERROR_CHARS = 2000  # the longest error text kept on a row

OutboxRow = type[Delivery] | type[TriageMessage]


def record_sent(session: Session, table: OutboxRow, row_id: int, now: datetime, **values: Any) -> bool:
    """An acknowledged attempt: the row is never sent again. False if it was already sent (or is gone)."""
    result = session.execute(
        update(table)
        .where(table.id == row_id, table.state != SENT)
        .values(state=SENT, sent_at=now, attempts=table.attempts + 1, next_attempt_at=None, last_error=None, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def record_failed(
    session: Session, table: OutboxRow, row_id: int, error: str, next_attempt_at: datetime | None, **values: Any
) -> None:
    """A failed attempt: retried at ``next_attempt_at``, or dead letter when that is None."""
    session.execute(
        update(table)
        .where(table.id == row_id, table.state != SENT)
        .values(
            state=PENDING if next_attempt_at is not None else DEAD,
            attempts=table.attempts + 1,
            next_attempt_at=next_attempt_at,
            last_error=error[:ERROR_CHARS],
            **values,
        )
        .execution_options(synchronize_session=False)
    )


# --- DICOM deliveries -----------------------------------------------------------------------------------


def new_delivery(destination: str, now: datetime) -> Delivery:
    """A new outbox row, due now."""
    return Delivery(destination=destination, state=PENDING, attempts=0, next_attempt_at=now, created_at=now)


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
        .where(Delivery.state == PENDING, Delivery.next_attempt_at <= now)
        .order_by(Delivery.next_attempt_at, Delivery.id)
        .limit(limit)
    ).all()
    return [DeliveryJob(*row) for row in rows]


def mark_sent(session: Session, delivery_id: int, status: int, now: datetime) -> None:
    """The destination acknowledged: never send this object there again; the result counts as delivered."""
    if not record_sent(session, Delivery, delivery_id, now, last_status=status):
        return
    result_id = session.scalar(
        select(ProducedObject.study_result_id)
        .join(Delivery, Delivery.produced_object_id == ProducedObject.id)
        .where(Delivery.id == delivery_id)
    )
    session.execute(
        update(StudyResult)
        .where(StudyResult.id == result_id, StudyResult.delivered_at.is_(None))
        .values(delivered_at=now)
        .execution_options(synchronize_session=False)
    )


def mark_failed(
    session: Session, delivery_id: int, status: int | None, error: str, next_attempt_at: datetime | None
) -> None:
    """Record a failed attempt: retry at ``next_attempt_at``, or dead letter when it is None."""
    record_failed(session, Delivery, delivery_id, error, next_attempt_at, last_status=status)


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


def latest_report(session: Session, study_instance_uid: str) -> ProducedObject | None:
    """The most recent SR fracwatch produced for the study, if any (what a resend sends, what a new SR supersedes)."""
    return session.scalars(
        select(ProducedObject)
        .join(StudyResult, StudyResult.id == ProducedObject.study_result_id)
        .join(Study, Study.id == StudyResult.study_id)
        .where(Study.study_instance_uid == study_instance_uid, ProducedObject.kind == "sr")
        .order_by(ProducedObject.id.desc())
    ).first()


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
        if delivery.state == SENT:
            acknowledged += 1
            continue
        delivery.state = PENDING
        delivery.attempts = 0
        delivery.next_attempt_at = now
        requeued += 1
    for destination in destinations:
        if destination not in seen:
            produced.deliveries.append(new_delivery(destination, now))
            added += 1
    return ResendOutcome(requeued, acknowledged, added)


# --- triage messages ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageJob:
    """A due triage message and what its body is built from."""

    id: int
    channel: str
    endpoint: str
    priority: str
    control_id: str
    attempts: int
    study_instance_uid: str
    accession_number: str | None
    category: str
    probability: float
    model_name: str
    model_version: str
    device_uid: str
    scored_at: datetime
    source_path: str | None  # a spooled instance of the study, for the patient identifier


def due_messages(session: Session, now: datetime, limit: int = 100) -> list[MessageJob]:
    """Pending messages whose next attempt is due, oldest first."""
    rows = session.execute(
        select(TriageMessage, Study, StudyResult)
        .join(Study, Study.id == TriageMessage.study_id)
        .join(StudyResult, StudyResult.id == TriageMessage.study_result_id)
        .where(TriageMessage.state == PENDING, TriageMessage.next_attempt_at <= now)
        .order_by(TriageMessage.id)
        .limit(limit)
    ).all()
    jobs = []
    for message, study, result in rows:
        source = session.scalar(
            select(Instance.path)
            .where(Instance.study_id == study.id, Instance.purged_at.is_(None))
            .order_by(Instance.scorable.desc(), Instance.id)
        )
        jobs.append(
            MessageJob(
                id=message.id,
                channel=message.channel,
                endpoint=message.endpoint,
                priority=message.priority,
                control_id=message.control_id,
                attempts=message.attempts,
                study_instance_uid=study.study_instance_uid,
                accession_number=study.accession_number,
                category=result.category,
                probability=result.probability or 0.0,
                model_name=result.model_name,
                model_version=result.model_version,
                device_uid=result.device_uid,
                scored_at=result.scored_at,
                source_path=source,
            )
        )
    return jobs


def mark_message_sent(session: Session, message_id: int, ack_code: str, now: datetime) -> None:
    """The receiver accepted the message."""
    record_sent(session, TriageMessage, message_id, now, ack_code=ack_code)


def mark_message_failed(
    session: Session, message_id: int, ack_code: str | None, error: str, next_attempt_at: datetime | None
) -> None:
    """A failed attempt: retried at ``next_attempt_at``, or dead when that is None."""
    record_failed(session, TriageMessage, message_id, error, next_attempt_at, ack_code=ack_code)


@dataclass(frozen=True)
class MessageSummary:
    """A triage message as the dashboard and API list it."""

    id: int
    study_instance_uid: str
    channel: str
    endpoint: str
    priority: str
    state: str
    attempts: int
    ack_code: str | None
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


def list_messages(session: Session, states: Sequence[str], limit: int = 200) -> list[MessageSummary]:
    """Triage messages in these states, newest first."""
    return _summaries(session, TriageMessage.state.in_(states), TriageMessage.id.desc(), limit)


def result_messages(session: Session, study_result_id: int) -> list[MessageSummary]:
    """The triage messages one result raised, oldest first."""
    return _summaries(session, TriageMessage.study_result_id == study_result_id, TriageMessage.id.asc(), None)


def _summaries(session: Session, where: Any, order: Any, limit: int | None) -> list[MessageSummary]:
    rows = session.execute(
        select(TriageMessage, Study.study_instance_uid)
        .join(Study, Study.id == TriageMessage.study_id)
        .where(where)
        .order_by(order)
        .limit(limit)
    ).all()
    return [
        MessageSummary(
            m.id,
            uid,
            m.channel,
            m.endpoint,
            m.priority,
            m.state,
            m.attempts,
            m.ack_code,
            m.last_error,
            m.created_at,
            m.sent_at,
        )
        for m, uid in rows
    ]
