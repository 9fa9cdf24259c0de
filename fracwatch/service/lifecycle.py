"""The study lifecycle: completion, the hand-over to the scoring jobs, and a job's claim on its study.

Completion is decided in the database (a conditional UPDATE) and the hand-over is a scoring job deferred in the
same transaction (``fracwatch.jobs``); the job runs a :class:`StudyProcessor` (the daemon's is the scorer in
``service.scoring``). A study handed over but not scored when its process stopped is handed over again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Any, Protocol

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from fracwatch.store import instances
from fracwatch.store.instances import HandOver

LOGGER = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current time, UTC, timezone-aware."""
    return datetime.now(UTC)


class StudyProcessor(Protocol):
    """What the worker does with complete study versions (a batch, so images can be batched across studies)."""

    def __call__(self, hand_overs: list[HandOver]) -> None: ...


def claim(sessions: sessionmaker[Any], hand_overs: list[HandOver], now: datetime) -> list[HandOver]:
    """Mark each study version ready (taken by the worker); drop those that re-opened meanwhile."""
    claimed = []
    for hand_over in hand_overs:
        with sessions() as session, session.begin():
            marked = instances.mark_ready(session, hand_over, now)
        if marked:
            LOGGER.info("study %s version %d ready", hand_over.study_instance_uid, hand_over.version)
            claimed.append(hand_over)
        else:
            LOGGER.info(
                "study %s version %d re-opened before processing; skipped",
                hand_over.study_instance_uid,
                hand_over.version,
            )
    return claimed


def detect_complete_studies(
    sessions: sessionmaker[Any],
    submit_in: Callable[[Session, HandOver], None],
    stable_after: float,
    clock: Clock = utc_now,
) -> list[HandOver]:
    """Mark studies quiet for ``stable_after`` seconds complete and hand each to ``submit_in`` in the same
    transaction (on PostgreSQL its scoring job commits with the state change, or neither does)."""
    with sessions() as session, session.begin():
        handed = instances.complete_stable_studies(session, clock(), stable_after)
        for hand_over in handed:
            submit_in(session, hand_over)
    for hand_over in handed:
        LOGGER.info("study %s version %d complete", hand_over.study_instance_uid, hand_over.version)
    return handed


def requeue_pending(
    sessions: sessionmaker[Any],
    submit: Callable[[HandOver], None],
    taken: bool = False,
    quiet: bool = False,
    skip: Collection[HandOver] = (),
) -> int:
    """Hand over again every study complete but never scored (and, with ``taken``, those a job had claimed
    when its process stopped), except those in ``skip`` (just handed over); return how many. Harmless when one
    already waits or runs: a no-op in the queue."""
    with sessions() as session:
        pending = [h for h in instances.pending_hand_overs(session, taken=taken) if h not in skip]
    for hand_over in pending:
        submit(hand_over)
    if pending and not quiet:
        LOGGER.info("re-queued %d study versions left unscored by a previous run", len(pending))
    return len(pending)


def build_scheduler() -> BackgroundScheduler:
    """An APScheduler (UTC) for the daemon's interval jobs; the caller adds them and starts it."""
    return BackgroundScheduler(timezone=UTC)
