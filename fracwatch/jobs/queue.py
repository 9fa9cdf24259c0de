"""Where jobs go: what a job is (task, arguments, locks) and the two queues that take them.

``PostgresQueue`` defers into Procrastinate's tables through the caller's own database transaction, so a job
exists exactly when the state change that causes it commits. ``MemoryQueue`` (embedded SQLite) defers into
Procrastinate's in-memory connector once the caller's transaction commits. Both refuse a second job with the
same queueing lock while one waits, which is what makes re-deferring (at start, at each tick) harmless. A scoring
job is also not deferred again while one for the same study version runs: Procrastinate's queueing lock covers
only waiting jobs, and a failed attempt's retry (back to waiting) would then collide with the newer copy — the
retry fails with a unique violation and the running job is left "doing" for good. One window is left: a job
whose fetch is committing while the copy is deferred is seen as neither; the completion tick therefore never
re-defers what it has just handed over (``RunningDaemon.detect_once``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import procrastinate
from procrastinate import testing
from procrastinate.exceptions import AlreadyEnqueued
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from fracwatch.store.instances import HandOver

LOGGER = logging.getLogger(__name__)

SCORING_QUEUE = "scoring"
TICKS_QUEUE = "ticks"

SCORE_STUDY = "score-study"
COMPLETE_STUDIES = "complete-studies"
DELIVER_RESULTS = "deliver-results"
SEND_TRIAGE = "send-triage-messages"
RETENTION = "retention"
RETRY_STALLED = "retry-stalled-jobs"

_PENDING_KEY = "fracwatch.pending_jobs"


@dataclass(frozen=True)
class Job:
    """One job to defer: the task's name, its JSON arguments and its locks.

    ``lock``: jobs sharing it never run at the same time (one scoring job per study, one run of a tick across
    the cluster). ``queueing_lock``: at most one such job waits in the queue (a second defer is a no-op).
    """

    task: str
    queue: str
    args: dict[str, Any] = field(default_factory=dict)
    lock: str | None = None
    queueing_lock: str | None = None
    once_running: bool = False  # not deferred while a job with the same queueing lock runs


def score_job(hand_over: HandOver) -> Job:
    """Score one study version (never two jobs at once for one study; one waiting per version)."""
    uid, version = hand_over.study_instance_uid, hand_over.version
    return Job(
        SCORE_STUDY,
        SCORING_QUEUE,
        {"study": uid, "version": version},
        lock=f"study:{uid}",
        queueing_lock=f"score:{uid}:{version}",
        once_running=True,
    )


def tick_job(task: str) -> Job:
    """One run of a cluster-wide periodic task: one at a time across every process, at most one waiting.

    The stalled-job check takes no job lock: a process killed while running it would hold that lock for good,
    and nothing would then recover the jobs that process held (its own run among them). It serialises itself
    with a PostgreSQL advisory lock instead, which dies with its holder's connection (tasks.retry_stalled).
    """
    return Job(task, TICKS_QUEUE, {}, lock=None if task == RETRY_STALLED else task, queueing_lock=task)


class JobQueue(Protocol):
    """Where the daemon defers jobs."""

    app: procrastinate.App

    def defer_in(self, session: Session, job: Job) -> None:
        """Defer ``job`` as part of ``session``'s transaction (it exists once that commits)."""

    def defer(self, job: Job) -> bool:
        """Defer ``job`` in a transaction of its own; False when an identical one already waits."""

    def pending(self, queue: str) -> int:
        """Jobs of ``queue`` waiting or running (retries scheduled later included)."""

    def close(self) -> None:
        """Release what the queue holds."""


def _configured(app: procrastinate.App, job: Job, connection: Any = None) -> Any:
    return app.configure_task(
        name=job.task,
        queue=job.queue,
        lock=job.lock,
        queueing_lock=job.queueing_lock,
        connection=connection,
    )


class PostgresQueue:
    """Procrastinate's tables in the results database; any number of processes share them."""

    def __init__(self, engine: Engine, sessions: sessionmaker[Any]) -> None:
        self._sessions = sessions
        self.conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        # The worker's app (asynchronous, its own pool; opened by the runner) ...
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=self.conninfo))
        # ... and the deferring one, only ever given the caller's connection: it opens nothing of its own.
        self._deferrer = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=self.conninfo))

    def defer_in(self, session: Session, job: Job) -> None:
        if _running_in(session, job):
            LOGGER.debug("job %s %s already running", job.task, job.args)
            return
        try:
            with session.begin_nested():  # a refused duplicate rolls back to here, not the caller's work
                raw = session.connection().connection.driver_connection
                _configured(self._deferrer, job, raw).defer(**job.args)
        except AlreadyEnqueued:
            LOGGER.debug("job %s %s already waiting", job.task, job.args)

    def defer(self, job: Job) -> bool:
        with self._sessions() as session, session.begin():
            if _running_in(session, job):
                return False
            raw = session.connection().connection.driver_connection
            try:
                _configured(self._deferrer, job, raw).defer(**job.args)
            except AlreadyEnqueued:
                return False
        return True

    def pending(self, queue: str) -> int:
        with self._sessions() as session:
            count = session.execute(
                text(
                    "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = :queue AND status IN ('todo', 'doing')"
                ),
                {"queue": queue},
            ).scalar_one()
        return int(count)

    def close(self) -> None:
        pass


def _running_in(session: Session, job: Job) -> bool:
    """True when ``job`` is ``once_running`` and a job with its queueing lock runs (in Procrastinate's table)."""
    if not job.once_running:
        return False
    running = session.execute(
        text("SELECT 1 FROM procrastinate_jobs WHERE queueing_lock = :lock AND status = 'doing' LIMIT 1"),
        {"lock": job.queueing_lock},
    ).first()
    return running is not None


class MemoryQueue:
    """Procrastinate's in-memory connector, run by this process's job runner (the embedded SQLite default).

    Not durable by itself: the study states are, and the daemon re-defers from them at start.
    """

    def __init__(self, sessions: sessionmaker[Any]) -> None:
        self.connector = testing.InMemoryConnector()
        self.app = procrastinate.App(connector=self.connector)
        self.loop: asyncio.AbstractEventLoop | None = None  # the runner's, once it runs
        event.listen(sessions, "after_commit", self._after_commit)
        event.listen(sessions, "after_soft_rollback", self._after_rollback)

    def defer_in(self, session: Session, job: Job) -> None:
        session.info.setdefault(_PENDING_KEY, []).append(job)

    def _after_commit(self, session: Session) -> None:
        for job in session.info.pop(_PENDING_KEY, []):
            self.defer(job)

    def _after_rollback(self, session: Session, _previous: Any) -> None:
        if not session.in_transaction():
            session.info.pop(_PENDING_KEY, None)

    def defer(self, job: Job) -> bool:
        if self.loop is None or not self.loop.is_running():
            raise RuntimeError("the job runner is not running; start it before deferring jobs")
        if job.once_running and any(
            row["queueing_lock"] == job.queueing_lock and row["status"] == "doing"
            for row in list(self.connector.jobs.values())
        ):
            return False
        future = asyncio.run_coroutine_threadsafe(_configured(self.app, job).defer_async(**job.args), self.loop)
        try:
            future.result(timeout=30)
        except AlreadyEnqueued:
            return False
        return True

    def pending(self, queue: str) -> int:
        jobs = list(self.connector.jobs.values())
        return sum(1 for job in jobs if job["queue_name"] == queue and job["status"] in ("todo", "doing"))

    def close(self) -> None:
        pass


class ScoringQueue:
    """The scoring jobs as the daemon sees them: hand a study version over, count what waits, wait for quiet."""

    def __init__(self, queue: JobQueue, running: Callable[[], bool]) -> None:
        self._queue = queue
        self._running = running

    def submit(self, hand_over: HandOver) -> None:
        """Defer the scoring of a study version (a no-op when one already waits)."""
        self._queue.defer(score_job(hand_over))

    def submit_in(self, session: Session, hand_over: HandOver) -> None:
        """Defer it as part of ``session``'s transaction (the one that marks the study complete)."""
        self._queue.defer_in(session, score_job(hand_over))

    @property
    def alive(self) -> bool:
        """True while this process's job runner runs."""
        return self._running()

    def backlog(self) -> int:
        """Scoring jobs waiting or running, in this whole queue (every process's)."""
        return self._queue.pending(SCORING_QUEUE)

    def wait_idle(self, timeout: float | None = None, poll: float = 0.05) -> bool:
        """Block until no scoring job waits or runs; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.backlog() > 0:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True


def open_queue(engine: Engine, sessions: sessionmaker[Any]) -> JobQueue:
    """The queue that suits the database: Procrastinate's tables on PostgreSQL, in memory on SQLite."""
    if engine.dialect.name == "postgresql":
        return PostgresQueue(engine, sessions)
    return MemoryQueue(sessions)
