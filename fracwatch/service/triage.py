"""Worklist triage: flag studies when a result raises their priority, and send HL7 / webhook messages.

The flag and its messages are written in the transaction that saves the result (``TriagePlanner`` is the
scorer's ``after_save`` hook), so a crash cannot leave a flagged study without its messages. ``TriageSender``
is driven by an APScheduler job (and kicked after scoring); failed attempts are retried with the outbox's
back-off policy, permanent rejections go to dead letter. Message bodies are built at each attempt from the
stored result and the spooled source's patient module: the database holds no patient identifier.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import hl7
from hl7.mllp import open_hl7_connection
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy.orm import Session, sessionmaker

from fracwatch.service.delivery import RetryPolicy
from fracwatch.service.lifecycle import Clock, utc_now
from fracwatch.service.metrics import Metrics
from fracwatch.store import triage as store
from fracwatch.store.triage import Endpoint, MessageJob
from fracwatch.triage.messages import HL7Header, TriageFacts, build_fhir_bundle, build_oru, read_ack

LOGGER = logging.getLogger(__name__)


class TriagePlanner:
    """Runs in the result's transaction: raise the study's flag and queue one message per endpoint."""

    def __init__(self, categories: Sequence[str], endpoints: Sequence[Endpoint]) -> None:
        self._categories = list(categories)
        self._endpoints = list(endpoints)

    def __call__(self, session: Session, study_result_id: int, now: datetime) -> None:
        control_id = uuid.uuid4().hex[:16]  # + ".N" per endpoint: within MSH-10's 20 characters
        ids = store.raise_flag(session, study_result_id, self._categories, self._endpoints, control_id, now)
        if ids:
            LOGGER.info("study result %d flagged; %d triage messages queued", study_result_id, len(ids))


@dataclass(frozen=True)
class Attempt:
    """The outcome of sending one message once."""

    accepted: bool
    code: str | None
    error: str | None = None
    permanent: bool = False


def _patient(path: str | None) -> tuple[str | None, str | None]:
    if path is None:
        return None, None
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "IssuerOfPatientID"])
    except (InvalidDicomError, OSError, ValueError):
        return None, None
    return (str(ds.get("PatientID", "")) or None, str(ds.get("IssuerOfPatientID", "")) or None)


def facts_of(job: MessageJob) -> TriageFacts:
    """What the message says, with the patient identifier read from the spooled source."""
    patient_id, issuer = _patient(job.source_path)
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
    )


async def _exchange_hl7(host: str, port: int, text: str, timeout: float) -> Any:
    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port, encoding="utf-8"), timeout)
    try:
        writer.writemessage(hl7.parse(text))
        await asyncio.wait_for(writer.drain(), timeout)
        return await asyncio.wait_for(reader.readmessage(), timeout)
    finally:
        writer.close()


def send_hl7(endpoint: str, facts: TriageFacts, header: HL7Header, now: datetime, timeout: float) -> Attempt:
    """One MLLP exchange: send the ORU^R01, read and interpret the ACK."""
    host, _, port = endpoint.rpartition(":")
    message = build_oru(facts, header, now)
    try:
        answer = asyncio.run(_exchange_hl7(host.strip("[]"), int(port), str(message), timeout))
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        return Attempt(False, None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    ack = read_ack(answer, facts.control_id)
    if ack.accepted:
        return Attempt(True, ack.code)
    return Attempt(False, ack.code or None, f"NAK {ack.code}: {ack.text}".strip(), permanent=ack.permanent)


def send_webhook(url: str, facts: TriageFacts, token: str | None, timeout: float) -> Attempt:
    """One POST of the FHIR Bundle; 2xx completes, 4xx (not 408/429) is permanent, the rest is retried."""
    body = json.dumps(build_fhir_bundle(facts)).encode("utf-8")
    headers = {"Content-Type": "application/fhir+json", "Idempotency-Key": facts.control_id}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310 (http/https only)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return Attempt(True, str(response.status))
    except urllib.error.HTTPError as exc:
        permanent = 400 <= exc.code < 500 and exc.code not in (408, 429)
        return Attempt(False, str(exc.code), f"HTTP {exc.code} {exc.reason}", permanent=permanent)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        return Attempt(False, None, f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")


class TriageSender:
    """Sends due triage messages; runs are serialised so a message is never sent twice at once."""

    def __init__(
        self,
        sessions: sessionmaker[Any],
        header: HL7Header,
        policy: RetryPolicy,
        webhook_token: str | None = None,
        timeout: float = 30.0,
        clock: Clock = utc_now,
        metrics: Metrics | None = None,
    ) -> None:
        self._sessions = sessions
        self._header = header
        self._policy = policy
        self._token = webhook_token
        self._timeout = timeout
        self._clock = clock
        self._metrics = metrics
        self._lock = threading.Lock()

    def run_once(self) -> int:
        """Attempt every due message once; return how many were accepted."""
        with self._lock:
            with self._sessions() as session:
                jobs = store.due_messages(session, self._clock())
            return sum(1 for job in jobs if self._attempt(job))

    def _attempt(self, job: MessageJob) -> bool:
        facts = facts_of(job)
        now = self._clock()
        if job.channel == "hl7":
            attempt = send_hl7(job.endpoint, facts, self._header, now, self._timeout)
        elif job.channel == "webhook":
            attempt = send_webhook(job.endpoint, facts, self._token, self._timeout)
        else:
            attempt = Attempt(False, None, f"unknown channel {job.channel!r}", permanent=True)
        now = self._clock()
        next_at = None
        with self._sessions() as session, session.begin():
            if attempt.accepted:
                store.mark_message_sent(session, job.id, attempt.code or "", now)
            else:
                next_at = None if attempt.permanent else self._policy.next_attempt(job.attempts + 1, now)
                store.mark_message_failed(session, job.id, attempt.code, attempt.error or "failed", next_at)
        outcome = "sent" if attempt.accepted else ("retry" if next_at is not None else "dead")
        if self._metrics is not None:
            self._metrics.triage_messages.labels(job.channel, outcome).inc()
        log = LOGGER.info if attempt.accepted else (LOGGER.warning if next_at is not None else LOGGER.error)
        log(
            "triage %s %s for study %s to %s: %s%s",
            job.channel,
            job.control_id,
            job.study_instance_uid,
            job.endpoint,
            outcome,
            f" ({attempt.error})" if attempt.error else "",
        )
        return attempt.accepted
