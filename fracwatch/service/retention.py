"""Retention: delete spool files older than ``retention_days``; rows stay, marked purged."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import sessionmaker

from fracwatch.service.lifecycle import Clock, utc_now
from fracwatch.service.metrics import Metrics
from fracwatch.store import retention
from fracwatch.store.retention import PurgeItem

LOGGER = logging.getLogger(__name__)


def cutoff_for(days: float, now: datetime) -> datetime:
    """Files received or created before this moment are due."""
    return now - timedelta(days=days)


def due_files(sessions: sessionmaker[Any], days: float, clock: Clock = utc_now) -> list[PurgeItem]:
    """What a purge would delete now (``fracwatch purge --dry-run``)."""
    with sessions() as session:
        return retention.purge_candidates(session, cutoff_for(days, clock()))


def purge(sessions: sessionmaker[Any], days: float, clock: Clock = utc_now, metrics: Metrics | None = None) -> int:
    """Delete due files, then mark their rows purged; return how many files went.

    A file already missing counts as deleted, so a purge interrupted between the unlink and the UPDATE
    completes on the next run.
    """
    items = due_files(sessions, days, clock)
    gone = []
    for item in items:
        try:
            os.unlink(item.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            LOGGER.error("retention: cannot delete %s %s: %s", item.kind, item.sop_instance_uid, exc.strerror)
            continue
        gone.append(item)
    if gone:
        with sessions() as session, session.begin():
            retention.mark_purged(session, gone, clock())
        LOGGER.info("retention: purged %d files older than %g days", len(gone), days)
    if metrics is not None:
        metrics.purged_files.inc(len(gone))
    return len(gone)
