"""The outbox sender: C-STORE pending objects to their destinations, retry with exponential back-off.

Driven by an APScheduler job (and kicked right after scoring). An object a destination acknowledged is
never sent to it again; a permanent rejection, or too many failed attempts, moves a delivery to dead letter.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import sessionmaker

from fracwatch.config import Destination
from fracwatch.dicom.scu import Outgoing, Peer, StoreOutcome, store_files
from fracwatch.service.lifecycle import Clock, utc_now
from fracwatch.service.metrics import Metrics
from fracwatch.service.outbox import SENT, Attempt, RetryPolicy, report, settle
from fracwatch.store import outbox
from fracwatch.store.outbox import DeliveryJob

LOGGER = logging.getLogger(__name__)


class Deliverer:
    """Sends due outbox rows, one association per destination per run."""

    def __init__(
        self,
        sessions: sessionmaker[Any],
        calling_ae: str,
        policy: RetryPolicy,
        timeout: float = 30.0,
        clock: Clock = utc_now,
        ssl_context: ssl.SSLContext | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._sessions = sessions
        self._calling_ae = calling_ae
        self._policy = policy
        self._timeout = timeout
        self._clock = clock
        self._ssl_context = ssl_context
        self._lock = threading.Lock()
        self._metrics = metrics

    def run_once(self) -> int:
        """Attempt every due delivery once; return how many were acknowledged.

        Runs are serialised (the scheduled job, a kick after scoring, a test): a due row is read and sent by
        one run only, so an acknowledged object is never sent twice to the same destination.
        """
        with self._lock:
            return self._run()

    def _run(self) -> int:
        with self._sessions() as session:
            jobs = outbox.due_deliveries(session, self._clock())
        by_destination: dict[str, list[DeliveryJob]] = defaultdict(list)
        for job in jobs:
            by_destination[job.destination].append(job)
        acknowledged = 0
        for destination, group in by_destination.items():
            acknowledged += self._send(destination, group)
        return acknowledged

    def _send(self, destination: str, jobs: list[DeliveryJob]) -> int:
        """Send ``jobs`` to ``destination``, recording each outcome as it comes (before the next file goes)."""
        try:
            target = Destination.parse(destination)
        except ValueError as exc:
            unusable = [StoreOutcome(Path(job.path), None, str(exc), permanent=True) for job in jobs]
            return sum(self._record(destination, job, outcome) for job, outcome in zip(jobs, unusable, strict=True))
        peer = Peer(
            target.ae_title, target.host, target.port, self._calling_ae, self._timeout, ssl_context=self._ssl_context
        )
        acknowledged = 0
        present: dict[Path, DeliveryJob] = {}
        for job in jobs:
            if Path(job.path).is_file():
                present[Path(job.path)] = job
            else:
                missing = StoreOutcome(Path(job.path), None, f"{Path(job.path).name} is missing", permanent=True)
                acknowledged += self._record(destination, job, missing)
        outgoing = [Outgoing(path, job.sop_class_uid) for path, job in present.items()]
        for outcome in store_files(peer, outgoing):
            acknowledged += self._record(destination, present[outcome.path], outcome)
        return acknowledged

    def _record(self, destination: str, job: DeliveryJob, outcome: StoreOutcome) -> int:
        """Mark one delivery sent or failed (with its next attempt); 1 when acknowledged."""
        now = self._clock()
        status = f"0x{outcome.status:04X}" if outcome.status is not None else None
        attempt = Attempt(outcome.acknowledged, status, outcome.error or "failed", outcome.permanent)
        settled = settle(self._policy, attempt, job.attempts, now)
        with self._sessions() as session, session.begin():
            if attempt.accepted:
                assert outcome.status is not None
                outbox.mark_sent(session, job.id, outcome.status, now)
            else:
                outbox.mark_failed(session, job.id, outcome.status, attempt.error or "failed", settled.next_attempt_at)
        self._count(settled.outcome, job, now)
        # operators' scripts wait for the "acknowledged by" line
        acknowledged_line = f"{job.sop_instance_uid} acknowledged by {destination}"
        report(LOGGER, f"{job.sop_instance_uid} to {destination}", settled, attempt, sent=acknowledged_line)
        return 1 if attempt.accepted else 0

    def _count(self, outcome: str, job: DeliveryJob, now: datetime) -> None:
        if self._metrics is None:
            return
        self._metrics.deliveries.labels(outcome).inc()
        if outcome == SENT:
            self._metrics.delivery_latency.observe(max(0.0, (now - job.created_at).total_seconds()))
