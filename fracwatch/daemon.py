"""The composition root: the one place where settings, database, spool, listener, scheduler, worker and the
HTTP side are wired together. Everything below it (``service``, ``web``, ``dicom``, ``store`` …) is imported
from here, never the other way round.
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from fracwatch.config import Settings
from fracwatch.dicom import tls
from fracwatch.dicom.scp import ListenerOptions, StorageSCP
from fracwatch.dicom.spool import Spool
from fracwatch.errors import DatabaseError
from fracwatch.model.bundle import Bundle, load_bundle
from fracwatch.model.predictor import Predictor
from fracwatch.service.channels import channels_of, triage_endpoints
from fracwatch.service.delivery import Deliverer
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
from fracwatch.service.metrics import Metrics
from fracwatch.service.outbox import RetryPolicy
from fracwatch.service.reconcile import reconcile
from fracwatch.service.retention import purge
from fracwatch.service.scoring import StudyScorer
from fracwatch.service.triage import TriagePlanner, TriageSender
from fracwatch.service.upload import ImageScorer
from fracwatch.store import db
from fracwatch.web.app import HttpServer, create_app
from fracwatch.web.context import WebContext

LOGGER = logging.getLogger(__name__)

DELIVERY_JOB = "deliver-results"
TRIAGE_JOB = "send-triage-messages"
RETENTION_JOB = "retention"


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


def _kick(scheduler: BackgroundScheduler) -> Callable[[], None]:
    """Run the outbox and triage senders now instead of at their next interval."""

    def kick() -> None:
        if scheduler.running:
            for job_id in (DELIVERY_JOB, TRIAGE_JOB):
                try:
                    scheduler.modify_job(job_id, next_run_time=utc_now())
                except JobLookupError:
                    pass

    return kick


@dataclass
class RunningDaemon:
    """A started daemon: every part is there (HTTP only when enabled). ``stop`` ends it."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Any]
    metrics: Metrics
    worker: Worker
    scheduler: BackgroundScheduler
    deliverer: Deliverer
    triage: TriageSender
    scp: StorageSCP
    http: HttpServer | None
    bundle: Bundle | None
    clock: Clock = utc_now

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        """Database reachable, listener accepting, worker and scheduler running."""
        checks = {
            "database": self._database_ok(),
            "listener": self.scp.running,
            "worker": self.worker.alive,
            "scheduler": self.scheduler.running,
        }
        return all(checks.values()), checks

    def _database_ok(self) -> bool:
        try:
            with self.sessions() as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return False
        return True

    def deliver_once(self) -> None:
        """One run of the outbox sender (the scheduler calls it; tests may too)."""
        try:
            self.deliverer.run_once()
        except SQLAlchemyError:
            LOGGER.exception("delivery run failed; will retry")

    def send_triage_once(self) -> None:
        """One run of the triage-message sender (the scheduler calls it; tests may too)."""
        try:
            self.triage.run_once()
        except SQLAlchemyError:
            LOGGER.exception("triage run failed; will retry")

    def purge_once(self) -> int:
        """One retention run (the scheduler calls it; tests may too); 0 when retention is off."""
        if self.settings.retention_days is None:
            return 0
        try:
            return purge(self.sessions, self.settings.retention_days, self.clock, self.metrics)
        except SQLAlchemyError:
            LOGGER.exception("retention run failed; will retry")
            return 0

    def detect_once(self) -> None:
        """One run of the completion job (the scheduler calls it; tests may too)."""
        try:
            detect_complete_studies(self.sessions, self.worker.submit, self.settings.stable_after, self.clock)
        except SQLAlchemyError:
            LOGGER.exception("completion check failed; will retry")

    def kick_senders(self) -> None:
        """Run the outbox and triage senders now instead of at their next interval."""
        _kick(self.scheduler)()

    def start(self) -> None:
        """Start the parts in order: worker (with the backlog re-queued), jobs, listener, HTTP."""
        self.worker.start()
        self.metrics.track_queue(self.worker.backlog)
        requeue_pending(self.sessions, self.worker.submit)
        settings = self.settings
        self._add_job(self.detect_once, settings.completion_interval, "detect-complete-studies")
        self._add_job(self.deliver_once, settings.delivery_interval, DELIVERY_JOB)
        self._add_job(self.send_triage_once, settings.triage_interval, TRIAGE_JOB)
        if settings.retention_days is not None:
            self._add_job(self.purge_once, settings.retention_interval, RETENTION_JOB)
        self.scheduler.start()
        self.scp.start()
        if self.http is not None:
            self.http.start()

    def _add_job(self, job: Callable[[], object], interval: float, job_id: str) -> None:
        self.scheduler.add_job(
            job, "interval", seconds=interval, id=job_id, max_instances=1, coalesce=True, next_run_time=utc_now()
        )

    def stop(self) -> None:
        """Stop accepting associations, drain in-flight writes, stop the jobs, close the database.

        Safe to call twice, and on a daemon whose start failed part-way.
        """
        if self.http is not None:
            self.http.stop()
        self.scp.stop(grace=self.settings.shutdown_grace)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.worker.stop()
        self.engine.dispose()
        LOGGER.info("fracwatch stopped")


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
        self._bundle = bundle
        self._stopping = threading.Event()

    def start(self) -> RunningDaemon:
        """Load the model, open the database, reconcile the spool, then start worker, jobs, listener, HTTP."""
        settings = self.settings
        bundle = self._bundle
        if self._processor is None and bundle is None:
            bundle = load_bundle(settings.model_path)
            LOGGER.info("model %s %s (Device UID %s)", bundle.card.name, bundle.card.version, bundle.card.device_uid)
        engine = open_database(settings)
        try:
            running = self._assemble(engine, bundle)
        except BaseException:
            engine.dispose()
            raise
        try:
            running.start()
        except BaseException:
            running.stop()
            raise
        return running

    def _assemble(self, engine: Engine, bundle: Bundle | None) -> RunningDaemon:
        settings, clock = self.settings, self._clock
        sessions = db.session_factory(engine)
        metrics = Metrics()
        spool = Spool(settings.spool_dir)
        spool.prepare()
        reports = Spool(settings.results_dir)
        reports.prepare()
        reconcile(spool, sessions)
        sender_tls = (
            tls.client_context(settings.destination_ca, settings.tls_cert, settings.tls_key)
            if settings.destination_tls
            else None
        )
        policy = RetryPolicy(settings.retry_base, settings.retry_max_delay, settings.max_attempts)
        deliverer = Deliverer(
            sessions, settings.ae_title, policy, settings.send_timeout, clock, ssl_context=sender_tls, metrics=metrics
        )
        triage = TriageSender(sessions, channels_of(settings), policy, clock, metrics)
        scheduler = build_scheduler()
        processor = self._processor
        if processor is None:
            assert bundle is not None
            processor = _scorer(settings, sessions, bundle, reports, _kick(scheduler), clock, metrics)
        worker = Worker(processor, settings.max_batch_studies)
        scp = StorageSCP(listener_options(settings), spool, DatabaseSink(sessions, metrics))
        running = RunningDaemon(
            settings, engine, sessions, metrics, worker, scheduler, deliverer, triage, scp, None, bundle, clock
        )
        if settings.http_enabled:
            web = WebContext(sessions, settings, metrics, running.readiness, _upload_scorer(bundle), clock)
            running.http = HttpServer(create_app(web), settings.http_host, settings.http_port)
        return running

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Ask :meth:`run` to return (signal handler)."""
        if signum is not None:
            LOGGER.info("received %s; shutting down", signal.Signals(signum).name)
        self._stopping.set()

    def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop."""
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            running = self.start()
            try:
                self._stopping.wait()
            finally:
                running.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _scorer(
    settings: Settings,
    sessions: sessionmaker[Any],
    bundle: Bundle,
    reports: Spool,
    on_scored: Callable[[], None],
    clock: Clock,
    metrics: Metrics,
) -> StudyScorer:
    predictor = Predictor(bundle.network, settings.device, settings.torch_threads, settings.batch_size)
    return StudyScorer(
        sessions,
        bundle,
        predictor,
        reports,
        [str(d) for d in settings.destinations],
        on_scored=on_scored,
        clock=clock,
        overlays=settings.overlays,
        after_save=TriagePlanner(settings.triage_categories, triage_endpoints(settings)),
        metrics=metrics,
    )


def _upload_scorer(bundle: Bundle | None) -> ImageScorer | None:
    """The web pages' Grad-CAM runs on a copy of the network of its own, off the worker's."""
    if bundle is None:
        return None
    return ImageScorer(Bundle(bundle.path, bundle.card, copy.deepcopy(bundle.network)))
