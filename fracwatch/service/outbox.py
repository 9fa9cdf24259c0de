"""What every outbox sender shares: the retry policy and the bookkeeping of one attempt.

The DICOM deliverer (``service.delivery``) and the triage sender (``service.triage``) each turn a send into an
:class:`Attempt`; :func:`settle` decides what follows (done, retry at a time, dead letter) and :func:`report`
counts and logs it the same way for both. The rows themselves are written by ``store.outbox``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

SENT, RETRY, DEAD = "sent", "retry", "dead"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off: base × 2^(attempts-1), capped; dead letter after ``max_attempts``."""

    base_seconds: float = 10.0
    max_delay_seconds: float = 3600.0
    max_attempts: int = 12

    def next_attempt(self, attempts: int, now: datetime) -> datetime | None:
        if attempts >= self.max_attempts:
            return None
        delay = min(self.base_seconds * 2 ** max(0, attempts - 1), self.max_delay_seconds)
        return now + timedelta(seconds=delay)


@dataclass(frozen=True)
class Attempt:
    """The outcome of sending one outbox row once: accepted, or failed transiently or permanently."""

    accepted: bool
    code: str | None  # the receiver's answer: DICOM status, HL7 acknowledgement code, HTTP status
    error: str | None = None
    permanent: bool = False


@dataclass(frozen=True)
class Settled:
    """What follows an attempt: ``outcome`` is sent, retry or dead; ``next_attempt_at`` is set for a retry."""

    outcome: str
    next_attempt_at: datetime | None = None


def settle(policy: RetryPolicy, attempt: Attempt, attempts_before: int, now: datetime) -> Settled:
    """Done when accepted; dead letter when permanent or out of attempts; else retry with back-off."""
    if attempt.accepted:
        return Settled(SENT)
    next_at = None if attempt.permanent else policy.next_attempt(attempts_before + 1, now)
    return Settled(RETRY, next_at) if next_at is not None else Settled(DEAD)


def report(logger: logging.Logger, what: str, settled: Settled, attempt: Attempt, sent: str | None = None) -> None:
    """One log line per attempt: INFO when sent (``sent``, else "WHAT: sent"), WARNING when retried, ERROR at
    dead letter."""
    if settled.outcome == SENT:
        logger.info("%s", sent or f"{what}: sent")
    elif settled.outcome == RETRY:
        logger.warning("%s failed (%s); retry at %s", what, attempt.error, settled.next_attempt_at)
    else:
        logger.error("%s: dead letter (%s)", what, attempt.error)
