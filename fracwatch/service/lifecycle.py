"""The study lifecycle: a scheduler job detects complete studies and a worker thread takes them.

Completion is decided in the database (a conditional UPDATE), the hand-over travels through an in-process
queue, and the worker runs a :class:`StudyProcessor` (the daemon's is the scorer in ``service.scoring``).
A study that was handed over but not processed when the process stopped is queued again at start.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import sessionmaker

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


_STOP = object()


class Worker:
    """One thread taking hand-overs from an in-process queue, in order, up to ``max_batch`` at a time."""

    def __init__(self, processor: StudyProcessor, max_batch: int = 8) -> None:
        self._processor = processor
        self._max_batch = max(1, max_batch)
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="fracwatch-worker", daemon=True)
        self._idle = threading.Condition()
        self._busy = 0

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def submit(self, hand_over: HandOver) -> None:
        """Queue a study version for processing."""
        with self._idle:
            self._busy += 1
        self._queue.put(hand_over)

    @property
    def alive(self) -> bool:
        """True while the worker thread runs."""
        return self._thread.is_alive()

    def backlog(self) -> int:
        """Study versions queued or in progress."""
        with self._idle:
            return self._busy

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or in progress; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout=timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the item in progress, then stop (queued items stay 'complete' and are re-queued at start)."""
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            stop_after = False
            while len(batch) < self._max_batch:
                try:
                    extra = self._queue.get_nowait()
                except queue.Empty:
                    break
                if extra is _STOP:
                    stop_after = True
                    break
                batch.append(extra)
            hand_overs = [h for h in batch if isinstance(h, HandOver)]
            try:
                self._processor(hand_overs)
            except Exception:
                LOGGER.exception("processing studies %s failed", ", ".join(h.study_instance_uid for h in hand_overs))
            finally:
                with self._idle:
                    self._busy -= len(batch)
                    self._idle.notify_all()
            if stop_after:
                return


def detect_complete_studies(
    sessions: sessionmaker[Any],
    submit: Callable[[HandOver], None],
    stable_after: float,
    clock: Clock = utc_now,
) -> list[HandOver]:
    """Mark studies quiet for ``stable_after`` seconds complete, then hand them to ``submit``."""
    with sessions() as session, session.begin():
        handed = instances.complete_stable_studies(session, clock(), stable_after)
    for hand_over in handed:
        LOGGER.info("study %s version %d complete", hand_over.study_instance_uid, hand_over.version)
        submit(hand_over)
    return handed


def requeue_pending(sessions: sessionmaker[Any], submit: Callable[[HandOver], None]) -> int:
    """Queue again every study handed over but never processed; return how many."""
    with sessions() as session:
        pending = instances.pending_hand_overs(session)
    for hand_over in pending:
        submit(hand_over)
    if pending:
        LOGGER.info("re-queued %d complete studies left from a previous run", len(pending))
    return len(pending)


def build_scheduler() -> BackgroundScheduler:
    """An APScheduler (UTC) for the daemon's interval jobs; the caller adds them and starts it."""
    return BackgroundScheduler(timezone=UTC)
