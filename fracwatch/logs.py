"""Logging set-up, the same in every fracwatch process (commands, the daemon, its scoring processes): UTC
timestamps on stderr; chatty libraries only from WARNING up."""

from __future__ import annotations

import logging
import time


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


NOISY_LOGGERS = ("pynetdicom", "apscheduler", "alembic", "procrastinate", "highdicom")


def configure_logging(level: str) -> None:
    """Log to stderr, UTC timestamps; pynetdicom, APScheduler, Procrastinate and highdicom (seven INFO lines per
    SR it builds) only from WARNING up."""
    handler = logging.StreamHandler()
    handler.setFormatter(_UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # A decoder failing on a broken stream logs an ERROR with a traceback; the image's error is recorded and
    # reported by fracwatch itself (one line, by UID).
    logging.getLogger("pydicom.pixels").setLevel(logging.CRITICAL)
    # A delivery kicked while the scheduled run is in progress is coalesced on purpose; APScheduler would log
    # each as a skipped execution.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
