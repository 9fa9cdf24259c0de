"""Worklist triage: flag studies when a result raises their priority, and send the flags' messages.

The flag and its messages are written in the transaction that saves the result (``TriagePlanner`` is the
scorer's ``after_save`` hook), so a crash cannot leave a flagged study without its messages. ``TriageSender``
is driven by an APScheduler job (and kicked after scoring) and hands each due message to its channel
(``service.channels``); failed attempts are retried with the outbox's back-off policy, permanent rejections go
to dead letter. Message bodies are built at each attempt from the stored result and the spooled source's
patient module: the database holds no patient identifier.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy.orm import Session, sessionmaker

from fracwatch.service.channels import TriageChannel
from fracwatch.service.lifecycle import Clock, utc_now
from fracwatch.service.metrics import Metrics
from fracwatch.service.outbox import Attempt, RetryPolicy, report, settle
from fracwatch.store import outbox, triage
from fracwatch.store.outbox import MessageJob
from fracwatch.store.triage import Endpoint
from fracwatch.triage.messages import TriageFacts

LOGGER = logging.getLogger(__name__)


class TriagePlanner:
    """Runs in the result's transaction: raise the study's flag and queue one message per endpoint."""

    def __init__(self, categories: Sequence[str], endpoints: Sequence[Endpoint]) -> None:
        self._categories = list(categories)
        self._endpoints = list(endpoints)

    def __call__(self, session: Session, study_result_id: int, now: datetime) -> None:
        control_id = uuid.uuid4().hex[:16]  # + ".N" per endpoint: within MSH-10's 20 characters
        ids = triage.raise_flag(session, study_result_id, self._categories, self._endpoints, control_id, now)
        if ids:
            LOGGER.info("study result %d flagged; %d triage messages queued", study_result_id, len(ids))


def _patient(path: str | None) -> tuple[str | None, str | None, str | None]:
    """(Patient ID, Issuer of Patient ID, Patient's Name) of the spooled source, read only to build a message."""
    if path is None:
        return None, None, None
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "IssuerOfPatientID", "PatientName"])
    except (InvalidDicomError, OSError, ValueError):
        return None, None, None
    return (
        str(ds.get("PatientID", "")) or None,
        str(ds.get("IssuerOfPatientID", "")) or None,
        str(ds.get("PatientName", "")) or None,
    )


def facts_of(job: MessageJob) -> TriageFacts:
    """What the message says, with the patient identifier read from the spooled source."""
    patient_id, issuer, name = _patient(job.source_path)
    return TriageFacts(
        control_id=job.control_id,
        priority=job.priority,
        category=job.category,
        probability=job.probability,
        study_instance_uid=job.study_instance_uid,
        accession_number=job.accession_number,
        patient_id=patient_id,
        issuer_of_patient_id=issuer,
        model_name=job.model_name,
        model_version=job.model_version,
        device_uid=job.device_uid,
        scored_at=job.scored_at,
        patient_name=name,
    )


class TriageSender:
    """Sends due triage messages through their channels; runs are serialised so none is sent twice at once."""

    def __init__(
        self,
        sessions: sessionmaker[Any],
        channels: Mapping[str, TriageChannel],
        policy: RetryPolicy,
        clock: Clock = utc_now,
        metrics: Metrics | None = None,
    ) -> None:
        self._sessions = sessions
        self._channels = dict(channels)
        self._policy = policy
        self._clock = clock
        self._metrics = metrics
        self._lock = threading.Lock()

    def run_once(self) -> int:
        """Attempt every due message once; return how many were accepted."""
        with self._lock:
            with self._sessions() as session:
                jobs = outbox.due_messages(session, self._clock())
            return sum(1 for job in jobs if self._attempt(job))

    def _attempt(self, job: MessageJob) -> bool:
        channel = self._channels.get(job.channel)
        if channel is None:
            attempt = Attempt(False, None, f"unknown channel {job.channel!r}", permanent=True)
        else:
            attempt = channel.send(job.endpoint, facts_of(job), self._clock())
        now = self._clock()
        settled = settle(self._policy, attempt, job.attempts, now)
        with self._sessions() as session, session.begin():
            if attempt.accepted:
                outbox.mark_message_sent(session, job.id, attempt.code or "", now)
            else:
                error = attempt.error or "failed"
                outbox.mark_message_failed(session, job.id, attempt.code, error, settled.next_attempt_at)
        if self._metrics is not None:
            self._metrics.triage_messages.labels(job.channel, settled.outcome).inc()
        what = f"triage {job.channel} {job.control_id} for study {job.study_instance_uid} to {job.endpoint}"
        report(LOGGER, what, settled, attempt)
        return attempt.accepted
