"""Worklist flags and the triage-message outbox. Callers own the session and its transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from fracwatch.store.models import Instance, Study, StudyResult, TriageMessage

PRIORITY_RANK = {"positive": 2, "doubt": 1}


@dataclass(frozen=True)
class Endpoint:
    """Where a triage message goes: channel ``hl7`` (HOST:PORT) or ``webhook`` (URL)."""

    channel: str
    address: str


def raise_flag(
    session: Session,
    study_result_id: int,
    categories: Sequence[str],
    endpoints: Sequence[Endpoint],
    control_id: str,
    now: datetime,
) -> list[int]:
    """Flag the result's study if its category outranks the study's current priority; queue messages.

    A priority is never lowered: a re-scored study whose new category is lower (or equal) keeps its flag and
    sends nothing. Returns the ids of the queued messages (none when the priority did not rise).
    """
    result = session.get(StudyResult, study_result_id)
    if result is None or result.category not in categories or result.category not in PRIORITY_RANK:
        return []
    rank = PRIORITY_RANK[result.category]
    current_ranks = [p for p, r in PRIORITY_RANK.items() if r >= rank]
    raised = session.execute(
        update(Study)
        .where(
            Study.id == result.study_id,
            or_(Study.triage_priority.is_(None), Study.triage_priority.not_in(current_ranks)),
        )
        .values(triage_priority=result.category, flagged_at=now)
    )
    if raised.rowcount == 0:  # type: ignore[attr-defined]
        return []
    ids = []
    for number, endpoint in enumerate(endpoints, start=1):
        message = TriageMessage(
            study_id=result.study_id,
            study_result_id=result.id,
            channel=endpoint.channel,
            endpoint=endpoint.address,
            priority=result.category,
            control_id=f"{control_id}.{number}"[:64],
            state="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        session.add(message)
        session.flush()
        ids.append(message.id)
    return ids


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
        .where(TriageMessage.state == "pending", TriageMessage.next_attempt_at <= now)
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
    session.execute(
        update(TriageMessage)
        .where(TriageMessage.id == message_id)
        .values(
            state="sent",
            ack_code=ack_code,
            sent_at=now,
            attempts=TriageMessage.attempts + 1,
            next_attempt_at=None,
            last_error=None,
        )
    )


def mark_message_failed(
    session: Session, message_id: int, ack_code: str | None, error: str, next_attempt_at: datetime | None
) -> None:
    """A failed attempt: retried at ``next_attempt_at``, or dead when that is None."""
    session.execute(
        update(TriageMessage)
        .where(TriageMessage.id == message_id)
        .values(
            state="pending" if next_attempt_at is not None else "dead",
            ack_code=ack_code,
            attempts=TriageMessage.attempts + 1,
            next_attempt_at=next_attempt_at,
            last_error=error[:2000],
        )
    )


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
