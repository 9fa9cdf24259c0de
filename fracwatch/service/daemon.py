"""The daemon: the one place where settings, database, spool, listener, scheduler and worker are wired."""

from __future__ import annotations

import copy
import logging
import signal
import threading
from collections.abc import Callable
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
from fracwatch.service.metrics import Metrics
from fracwatch.service.reconcile import reconcile
from fracwatch.service.retention import purge
from fracwatch.service.scoring import StudyScorer
from fracwatch.service.triage import TriagePlanner, TriageSender
from fracwatch.store import db
from fracwatch.store.triage import Endpoint
from fracwatch.triage.messages import HL7Header
from fracwatch.web.app import HttpServer, create_app
from fracwatch.web.context import ImageScorer, WebContext

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


def triage_endpoints(settings: Settings) -> list[Endpoint]:
    """Every configured triage receiver."""
    return [Endpoint("hl7", str(e)) for e in settings.triage_hl7] + [
        Endpoint("webhook", url) for url in settings.triage_webhooks
    ]


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
        self.metrics = Metrics()
        self.triage: TriageSender | None = None
        self.http: HttpServer | None = None

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
            metrics=self.metrics,
        )
        policy = RetryPolicy(settings.retry_base, settings.retry_max_delay, settings.max_attempts)
        self.triage = TriageSender(
            self.sessions,
            HL7Header(
                settings.hl7_sending_application,
                settings.hl7_sending_facility,
                settings.hl7_receiving_application,
                settings.hl7_receiving_facility,
            ),
            policy,
            settings.webhook_token.get_secret_value() if settings.webhook_token else None,
            settings.send_timeout,
            self._clock,
            self.metrics,
        )
        self.worker = Worker(self._processor or self._scorer(reports), settings.max_batch_studies)
        self.worker.start()
        self.metrics.track_queue(self.worker.backlog)
        requeue_pending(self.sessions, self.worker.submit)
        self._scheduler = build_scheduler(self.detect_once, settings.completion_interval)
        self._add_job(self.deliver_once, settings.delivery_interval, DELIVERY_JOB)
        self._add_job(self.send_triage_once, settings.triage_interval, TRIAGE_JOB)
        if settings.retention_days is not None:
            self._add_job(self.purge_once, settings.retention_interval, RETENTION_JOB)
        self._scheduler.start()
        self.scp = StorageSCP(listener_options(settings), spool, DatabaseSink(self.sessions, self.metrics))
        self.scp.start()
        if settings.http_enabled:
            self.http = HttpServer(create_app(self._web_context()), settings.http_host, settings.http_port)
            self.http.start()

    def _add_job(self, job: Callable[[], object], interval: float, job_id: str) -> None:
        assert self._scheduler is not None
        self._scheduler.add_job(
            job, "interval", seconds=interval, id=job_id, max_instances=1, coalesce=True, next_run_time=utc_now()
        )

    def _web_context(self) -> WebContext:
        assert self.sessions is not None
        scorer = None
        if self.bundle is not None:
            # The web pages' Grad-CAM runs on a copy of the network of its own, off the worker's.
            bundle = self.bundle
            scorer = ImageScorer(Bundle(bundle.path, bundle.card, copy.deepcopy(bundle.network)))
        return WebContext(self.sessions, self.settings, self.metrics, self.readiness, scorer, self._clock)

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        """Database reachable, listener accepting, worker and scheduler running."""
        checks = {
            "database": self._database_ok(),
            "listener": self.scp is not None and self.scp.running,
            "worker": self.worker is not None and self.worker.alive,
            "scheduler": self._scheduler is not None and self._scheduler.running,
        }
        return all(checks.values()), checks

    def _database_ok(self) -> bool:
        if self.sessions is None:
            return False
        try:
            with self.sessions() as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return False
        return True

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
            on_scored=self.kick_senders,
            clock=self._clock,
            overlays=settings.overlays,
            after_save=TriagePlanner(settings.triage_categories, triage_endpoints(settings)),
            metrics=self.metrics,
        )

    def deliver_once(self) -> None:
        """One run of the outbox sender (the scheduler calls it; tests may too)."""
        assert self.deliverer is not None
        try:
            self.deliverer.run_once()
        except SQLAlchemyError:
            LOGGER.exception("delivery run failed; will retry")

    def send_triage_once(self) -> None:
        """One run of the triage-message sender (the scheduler calls it; tests may too)."""
        assert self.triage is not None
        try:
            self.triage.run_once()
        except SQLAlchemyError:
            LOGGER.exception("triage run failed; will retry")

    def purge_once(self) -> int:
        """One retention run (the scheduler calls it; tests may too)."""
        assert self.sessions is not None and self.settings.retention_days is not None
        try:
            return purge(self.sessions, self.settings.retention_days, self._clock, self.metrics)
        except SQLAlchemyError:
            LOGGER.exception("retention run failed; will retry")
            return 0

    def kick_senders(self) -> None:
        """Run the outbox and triage senders now instead of at their next interval."""
        scheduler = self._scheduler
        if scheduler is not None and scheduler.running:
            for job_id in (DELIVERY_JOB, TRIAGE_JOB):
                try:
                    scheduler.modify_job(job_id, next_run_time=utc_now())
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
        if self.http is not None:
            self.http.stop()
            self.http = None
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
