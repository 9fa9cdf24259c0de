"""Worklist flags: raising a study's triage priority and queueing its messages (sent from the outbox).

Callers own the session and its transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from fracwatch.store.models import Study, StudyResult, TriageMessage

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
