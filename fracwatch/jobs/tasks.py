"""The tasks the job runner runs, and what each does when it fails.

``score-study`` scores one study version in the sandbox; a failed attempt is retried with back-off and the last
one dead-letters the study (state ``failed`` with the reason) so it never waits silently. The ticks run the
daemon's periodic work once at a time across every process sharing the queue. ``retry-stalled-jobs`` (the
PostgreSQL queue) gives the jobs of a process that died without a word (SIGKILL, power) to another one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import procrastinate
from procrastinate import JobContext, RetryStrategy
from procrastinate.exceptions import UniqueViolation
from procrastinate.jobs import Status
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import sessionmaker

from fracwatch.jobs.queue import (
    DELIVER_RESULTS,
    RETRY_STALLED,
    SCORE_STUDY,
    SCORING_QUEUE,
    SEND_TRIAGE,
    TICKS_QUEUE,
    JobQueue,
    tick_job,
)
from fracwatch.jobs.sandbox import ScoringFailed
from fracwatch.service.lifecycle import Clock, claim
from fracwatch.service.metrics import Metrics
from fracwatch.store import instances, results
from fracwatch.store.instances import HandOver

LOGGER = logging.getLogger(__name__)

Score = Callable[[HandOver, datetime], None]
"""Score one study version as of a time, raising :class:`ScoringFailed` when it cannot (the sandbox's)."""


@dataclass
class Handlers:
    """What the tasks act on; built by the composition root."""

    sessions: sessionmaker[Any]
    queue: JobQueue
    score: Score
    clock: Clock
    metrics: Metrics
    attempts: int  # in all, the first one included
    retry_wait: int
    stalled_after: float
    ticks: dict[str, Callable[[], object]] = field(default_factory=dict)

    def score_study(self, context: JobContext, study: str, version: int) -> None:
        """One attempt at scoring ``study`` at ``version`` (Procrastinate counts the attempts)."""
        hand_over = HandOver(study, version)
        attempt = context.job.attempts + 1
        now = self.clock()
        # Claimed before it waits for a scoring process (the sandbox may batch it behind others): a claimed study
        # is not handed over again by the completion tick meanwhile, and one re-opened or already scored is
        # dropped here without taking a process's time. The scorer's own claim then finds it taken, as after a
        # retry.
        if not claim(self.sessions, [hand_over], now):
            return
        try:
            self.score(hand_over, now)
        except ScoringFailed as exc:
            if attempt >= self.attempts:
                self._dead_letter(hand_over, f"{exc.reason} (attempt {attempt} of {self.attempts})")
            else:
                LOGGER.warning(
                    "study %s version %d: attempt %d of %d failed, will retry: %s",
                    study,
                    version,
                    attempt,
                    self.attempts,
                    exc.reason,
                )
            raise
        self._count(hand_over)
        for task in (DELIVER_RESULTS, SEND_TRIAGE):  # send the new SR and flag now, not at the next tick
            self.queue.defer(tick_job(task))

    def _count(self, hand_over: HandOver) -> None:
        with self.sessions() as session:
            scored = results.scored_version(session, hand_over.study_instance_uid, hand_over.version)
        if scored is None:  # skipped (nothing scorable) or re-opened meanwhile
            return
        self.metrics.studies_scored.labels(scored.category).inc()
        self.metrics.images_scored.inc(scored.images_scored)
        if scored.seconds_since_complete is not None:
            self.metrics.scoring_latency.observe(scored.seconds_since_complete)

    def _dead_letter(self, hand_over: HandOver, reason: str) -> None:
        with self.sessions() as session, session.begin():
            failed = instances.dead_letter(session, hand_over, reason, self.clock())
        if failed:
            self.metrics.dead_letters.inc()
            LOGGER.error(
                "study %s version %d dead-lettered: %s", hand_over.study_instance_uid, hand_over.version, reason
            )

    async def retry_stalled(self, context: JobContext) -> None:
        """Jobs whose process stopped sending heartbeats: run them again elsewhere, or dead-letter a scoring job
        that has used its attempts (a study that kills its worker process every time)."""
        held = await asyncio.to_thread(self._stalled_check_lock)
        if held is None:
            return  # another process is checking right now
        try:
            await self._retry_stalled(context)
        finally:
            await asyncio.to_thread(_release, held)

    def _stalled_check_lock(self) -> Connection | None:
        """A connection holding the cluster's stalled-check advisory lock, or None when another process holds it
        (the lock goes with its connection: a process that dies mid-check does not keep it)."""
        engine: Engine = self.sessions.kw["bind"]
        connection = engine.connect()
        if connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": STALLED_CHECK_LOCK}):
            connection.commit()
            return connection
        connection.close()
        return None

    async def _retry_stalled(self, context: JobContext) -> None:
        manager = context.app.job_manager
        for job in await manager.get_stalled_jobs(seconds_since_heartbeat=self.stalled_after):
            if job.task_name == SCORE_STUDY and job.attempts + 1 >= self.attempts:
                await manager.finish_job(job, status=Status.FAILED, delete_job=False)
                hand_over = HandOver(str(job.task_kwargs["study"]), int(str(job.task_kwargs["version"])))
                reason = f"its worker process died during every attempt ({job.attempts + 1} of {self.attempts})"
                await asyncio.to_thread(self._dead_letter, hand_over, reason)
                continue
            LOGGER.warning("job %s %s stalled (its process stopped); running it again", job.task_name, job.id)
            try:
                await manager.retry_job(job)
            except UniqueViolation:  # the same work already waits in a newer job: let that one run it
                await manager.finish_job(job, status=Status.FAILED, delete_job=False)


STALLED_CHECK_LOCK = 0x66726173  # "fras": the advisory lock of the stalled-job check


def _release(connection: Connection) -> None:
    try:
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": STALLED_CHECK_LOCK})
        connection.commit()
    finally:
        connection.close()


def register(app: procrastinate.App, handlers: Handlers) -> None:
    """Register every task on ``app`` (a job runner's)."""
    retry = RetryStrategy(
        max_attempts=handlers.attempts - 1,
        exponential_wait=handlers.retry_wait,
        retry_exceptions=[ScoringFailed],
    )
    app.task(name=SCORE_STUDY, queue=SCORING_QUEUE, pass_context=True, retry=retry)(handlers.score_study)
    app.task(name=RETRY_STALLED, queue=TICKS_QUEUE, pass_context=True)(handlers.retry_stalled)
    for name, run in handlers.ticks.items():
        app.task(name=name, queue=TICKS_QUEUE)(_tick(run))


def _tick(run: Callable[[], object]) -> Callable[[], None]:
    def tick() -> None:
        run()

    return tick
