"""Start-up reconciliation: register spool files that have no database row.

That happens when the process dies between the rename into the spool and the database commit: the sender
got no success status and will probably resend, but the file is complete and must not be orphaned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import sessionmaker

from fracwatch.dicom.header import header_from_file, source_ae_of_file
from fracwatch.dicom.spool import Spool
from fracwatch.domain import ReceivedInstance, is_scorable
from fracwatch.errors import InvalidInstanceError
from fracwatch.store import instances

LOGGER = logging.getLogger(__name__)

RECONCILER_AE = "RECONCILED"


@dataclass(frozen=True)
class ReconcileReport:
    """What the reconciler found."""

    scanned: int
    registered: int
    unreadable: int


def reconcile(spool: Spool, sessions: sessionmaker[Any]) -> ReconcileReport:
    """Register every spool file unknown to the database; leave unreadable ones in place, logged."""
    with sessions() as session:
        known = instances.held_paths(session)
    scanned = registered = unreadable = 0
    for path in spool.files():
        scanned += 1
        if str(path) in known:
            continue
        try:
            header = header_from_file(path)
        except InvalidInstanceError as exc:
            unreadable += 1
            LOGGER.error("spool file %s cannot be registered: %s", path.name, exc)
            continue
        stat = path.stat()
        received = ReceivedInstance(
            header=header,
            path=path,
            size_bytes=stat.st_size,
            calling_ae=source_ae_of_file(path) or RECONCILER_AE,
            received_at=datetime.fromtimestamp(stat.st_mtime, UTC),
        )
        with sessions() as session, session.begin():
            outcome = instances.record_instance(session, received, is_scorable(header))
        if outcome.created:
            registered += 1
            LOGGER.info("registered orphan spool file for instance %s", header.sop_instance_uid)
    report = ReconcileReport(scanned, registered, unreadable)
    LOGGER.info("reconciled spool: %d files, %d registered, %d unreadable", scanned, registered, unreadable)
    return report
