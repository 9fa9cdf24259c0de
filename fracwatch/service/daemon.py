"""The daemon: the one place where settings, database, spool, listener, scheduler and worker are wired."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from fracwatch.config import Settings
from fracwatch.dicom import tls
from fracwatch.dicom.scp import ListenerOptions, StorageSCP
from fracwatch.dicom.spool import Spool
from fracwatch.errors import DatabaseError
from fracwatch.model.bundle import Bundle, load_bundle
from fracwatch.model.predictor import Predictor
from fracwatch.service.delivery import Deliverer, RetryPolicy
from fracwatch.service.ingest import DatabaseSink
from fracwatch.service.lifecycle import (
    Clock,
    StudyProcessor,
    Worker,
    build_scheduler,
    detect_complete_studies,
    requeue_pending,
    utc_now,
)
from fracwatch.service.reconcile import reconcile
from fracwatch.service.scoring import StudyScorer
from fracwatch.store import db

LOGGER = logging.getLogger(__name__)

DELIVERY_JOB = "deliver-results"


def listener_options(settings: Settings) -> ListenerOptions:
    """The listener part of the settings."""
    context = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        context = tls.server_context(settings.tls_cert, settings.tls_key, settings.tls_ca)
    return ListenerOptions(
        ae_title=settings.ae_title,
        host=settings.host,
        port=settings.port,
        allowed_calling_aets=tuple(settings.allowed_calling_aets),
        ssl_context=context,
        max_pdu=settings.max_pdu,
        max_associations=settings.max_associations,
        acse_timeout=settings.acse_timeout,
        dimse_timeout=settings.dimse_timeout,
        network_timeout=settings.network_timeout,
    )


def open_database(settings: Settings) -> Engine:
    """Create the engine and migrate the schema to head."""
    engine = db.make_engine(settings.database_url)
    try:
        revision = db.upgrade(engine)  # raises DatabaseError for any database failure
    except DatabaseError:
        engine.dispose()
        raise
    LOGGER.info("database %s at revision %s", engine.url.render_as_string(), revision)
    return engine


class Daemon:
    """fracwatch serve: receive, track and hand over studies until told to stop."""

    def __init__(
        self,
        settings: Settings,
        processor: StudyProcessor | None = None,
        clock: Clock = utc_now,
        bundle: Bundle | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._processor = processor
        self.bundle: Bundle | None = bundle
        self.deliverer: Deliverer | None = None
        self._stopping = threading.Event()
        self.engine: Engine | None = None
        self.sessions: sessionmaker[Any] | None = None
        self.scp: StorageSCP | None = None
        self.worker: Worker | None = None
        self._scheduler: BackgroundScheduler | None = None

    def start(self) -> None:
        """Load the model, open the database, reconcile the spool, start worker, jobs and listener."""
        settings = self.settings
        if self._processor is None and self.bundle is None:
            loaded = load_bundle(settings.model_path)
            LOGGER.info("model %s %s (Device UID %s)", loaded.card.name, loaded.card.version, loaded.card.device_uid)
            self.bundle = loaded
        self.engine = open_database(settings)
        self.sessions = db.session_factory(self.engine)
        spool = Spool(settings.spool_dir)
        spool.prepare()
        reports = Spool(settings.results_dir)
        reports.prepare()
        reconcile(spool, self.sessions)
        sender_tls = (
            tls.client_context(settings.destination_ca, settings.tls_cert, settings.tls_key)
            if settings.destination_tls
            else None
        )
        self.deliverer = Deliverer(
            self.sessions,
            settings.ae_title,
            RetryPolicy(settings.retry_base, settings.retry_max_delay, settings.max_attempts),
            settings.send_timeout,
            self._clock,
            ssl_context=sender_tls,
        )
        self.worker = Worker(self._processor or self._scorer(reports), settings.max_batch_studies)
        self.worker.start()
        requeue_pending(self.sessions, self.worker.submit)
        self._scheduler = build_scheduler(self.detect_once, settings.completion_interval)
        self._scheduler.add_job(
            self.deliver_once,
            "interval",
            seconds=settings.delivery_interval,
            id=DELIVERY_JOB,
            max_instances=1,
            coalesce=True,
            next_run_time=utc_now(),
        )
        self._scheduler.start()
        self.scp = StorageSCP(listener_options(settings), spool, DatabaseSink(self.sessions))
        self.scp.start()

    def _scorer(self, reports: Spool) -> StudyScorer:
        assert self.sessions is not None and self.bundle is not None
        settings = self.settings
        predictor = Predictor(self.bundle.network, settings.device, settings.torch_threads, settings.batch_size)
        return StudyScorer(
            self.sessions,
            self.bundle,
            predictor,
            reports,
            [str(d) for d in settings.destinations],
            on_scored=self.kick_delivery,
            clock=self._clock,
            overlays=settings.overlays,
        )

    def deliver_once(self) -> None:
        """One run of the outbox sender (the scheduler calls it; tests may too)."""
        assert self.deliverer is not None
        try:
            self.deliverer.run_once()
        except SQLAlchemyError:
            LOGGER.exception("delivery run failed; will retry")

    def kick_delivery(self) -> None:
        """Run the outbox sender now instead of at its next interval."""
        scheduler = self._scheduler
        if scheduler is not None and scheduler.running:
            try:
                scheduler.modify_job(DELIVERY_JOB, next_run_time=utc_now())
            except JobLookupError:
                pass

    def detect_once(self) -> None:
        """One run of the completion job (the scheduler calls it; tests may too)."""
        assert self.sessions is not None and self.worker is not None
        try:
            detect_complete_studies(self.sessions, self.worker.submit, self.settings.stable_after, self._clock)
        except SQLAlchemyError:
            LOGGER.exception("completion check failed; will retry")

    def stop(self) -> None:
        """Stop accepting associations, drain in-flight writes, stop the jobs, close the database."""
        if self.scp is not None:
            self.scp.stop(grace=self.settings.shutdown_grace)
            self.scp = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None
        LOGGER.info("fracwatch stopped")

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Ask :meth:`run` to return (signal handler)."""
        if signum is not None:
            LOGGER.info("received %s; shutting down", signal.Signals(signum).name)
        self._stopping.set()

    def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop."""
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            self._stopping.wait()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
