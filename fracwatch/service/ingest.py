"""The SCP's sink: records spooled instances in the database."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from fracwatch.domain import InstanceHeader, ReceivedInstance, RecordOutcome, is_scorable
from fracwatch.service.metrics import Metrics
from fracwatch.store import instances

LOGGER = logging.getLogger(__name__)


class DatabaseSink:
    """Implements :class:`fracwatch.dicom.scp.InstanceSink` on the result database."""

    def __init__(self, sessions: sessionmaker[Any], metrics: Metrics | None = None) -> None:
        self._sessions = sessions
        self._metrics = metrics

    def is_held(self, header: InstanceHeader) -> bool:
        """True when the instance has a row and its file is still on disk."""
        with self._sessions() as session:
            instance = instances.find_instance(session, header.sop_instance_uid)
            return instance is not None and Path(instance.path).exists()

    def record(self, received: ReceivedInstance) -> RecordOutcome:
        """Record ``received`` in one transaction; a concurrent duplicate counts as a resend."""
        try:
            outcome = self._record(received)
        except IntegrityError:
            # Two associations delivered the same new instance (or study/series) at once; retry once,
            # now that the other transaction's rows are visible.
            outcome = self._record(received)
        if self._metrics is not None:
            self._metrics.instances_received.labels("stored" if outcome.created else "duplicate").inc()
        if outcome.reopened:
            LOGGER.info(
                "study %s re-opened as version %d by instance %s",
                received.header.study_instance_uid,
                outcome.study_version,
                received.header.sop_instance_uid,
            )
        return outcome

    def _record(self, received: ReceivedInstance) -> RecordOutcome:
        # No database lookup of our own produced objects is needed here: they are SR, KOS and SC with Modality
        # OT and our manufacturer, none of which is_scorable() accepts (tests send them back to prove it).
        scorable = is_scorable(received.header)
        with self._sessions() as session, session.begin():
            return instances.record_instance(session, received, scorable)
