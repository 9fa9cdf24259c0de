"""The composition root: the one place where settings, database, spool, listener, scheduler, worker and the
HTTP side are wired together. Everything below it (``service``, ``web``, ``dicom``, ``store`` …) is imported
from here, never the other way round.
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from fracwatch.config import Settings
from fracwatch.dicom import tls
from fracwatch.dicom.scp import ListenerOptions, StorageSCP
from fracwatch.dicom.spool import Spool
from fracwatch.errors import DatabaseError
from fracwatch.jobs.queue import (
    COMPLETE_STUDIES,
    DELIVER_RESULTS,
    RETENTION,
    RETRY_STALLED,
    SCORING_QUEUE,
    SEND_TRIAGE,
    TICKS_QUEUE,
    JobQueue,
    MemoryQueue,
    ScoringQueue,
    open_queue,
    tick_job,
)
from fracwatch.jobs.runner import JobRunner
from fracwatch.jobs.sandbox import SandboxOptions, ScoringFailed, ScoringPool
from fracwatch.jobs.tasks import Handlers, Score, register
from fracwatch.model import runtimes
from fracwatch.model.bundle import Bundle, load_bundle
from fracwatch.model.predictor import select_device
from fracwatch.service import datadir
from fracwatch.service.channels import channels_of
from fracwatch.service.delivery import Deliverer
from fracwatch.service.ingest import DatabaseSink
from fracwatch.service.lifecycle import (
    Clock,
    StudyProcessor,
    build_scheduler,
    detect_complete_studies,
    requeue_pending,
    utc_now,
)
from fracwatch.service.metrics import Metrics
from fracwatch.service.outbox import RetryPolicy
from fracwatch.service.reconcile import reconcile
from fracwatch.service.retention import purge
from fracwatch.service.triage import TriageSender
from fracwatch.service.upload import ImageScorer
from fracwatch.store import db
from fracwatch.store.instances import HandOver
from fracwatch.web.app import HttpServer, create_app
from fracwatch.web.context import WebContext

LOGGER = logging.getLogger(__name__)



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
        reuse_port=settings.reuse_port,
    )


def refuse_missing_database(settings: Settings) -> None:
    """A daemon creates only its data directory's own SQLite file (the embedded default); any other database
    that does not exist is a mistake to stop on (a typo in --db would start an empty database)."""
    path = db.sqlite_file(settings.database_url)
    if path is not None and not path.exists() and path.resolve() != settings.own_database:
        raise DatabaseError(
            f"the database {path} does not exist: `fracwatch db upgrade --db {settings.database_url}` creates it "
            f"(a daemon creates only its data directory's own {settings.own_database.name})"
        )


def open_database(settings: Settings) -> Engine:
    """Create the engine and migrate the schema to head."""
    engine = db.make_engine(settings.database_url, settings.data_dir)
    try:
        revision = db.upgrade(engine)  # raises DatabaseError for any database failure
    except DatabaseError:
        engine.dispose()
        raise
    LOGGER.info("database %s at revision %s", engine.url.render_as_string(), revision)
    return engine


@dataclass
class RunningDaemon:
    """A started daemon: every part is there (HTTP only when enabled; the scoring pool only with workers).
    ``stop`` ends it."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Any]
    metrics: Metrics
    queue: JobQueue
    worker: ScoringQueue
    runner: JobRunner
    pool: ScoringPool | None
    scheduler: BackgroundScheduler
    deliverer: Deliverer
    triage: TriageSender
    scp: StorageSCP
    http: HttpServer | None
    bundle: Bundle | None
    clock: Clock = utc_now
    lock: db.DatabaseLock | None = None
    receive: bool = True  # False: a worker host (jobs only; the listener is never started)

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        """Database reachable, listener accepting, job runner and scheduler running."""
        checks = {
            "database": self._database_ok(),
            "listener": self.scp.running or not self.receive,
            "worker": self.runner.alive,
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
        """One run of the outbox sender (the delivery tick runs it; tests may too)."""
        try:
            self.deliverer.run_once()
        except SQLAlchemyError:
            LOGGER.exception("delivery run failed; will retry")

    def send_triage_once(self) -> None:
        """One run of the triage-message sender (the triage tick runs it; tests may too)."""
        try:
            self.triage.run_once()
        except SQLAlchemyError:
            LOGGER.exception("triage run failed; will retry")

    def purge_once(self) -> int:
        """One retention run (the retention tick runs it; tests may too); 0 when retention is off."""
        if self.settings.retention_days is None:
            return 0
        try:
            return purge(self.sessions, self.settings.retention_days, self.clock, self.metrics)
        except SQLAlchemyError:
            LOGGER.exception("retention run failed; will retry")
            return 0

    def detect_once(self) -> None:
        """One run of the completion job (the completion tick runs it; tests may too)."""
        try:
            handed = detect_complete_studies(
                self.sessions, self.worker.submit_in, self.settings.stable_after, self.clock
            )
            # and any complete study without a waiting job (re-queued by an admin, deferred by an older version):
            # a no-op for those whose job waits or runs. Not those just handed over: a worker may be taking their
            # jobs this instant, and a job in the middle of being taken is neither waiting nor running to the
            # queue's check (jobs.queue) — without this skip the PostgreSQL fault test failed 2 runs in 5.
            requeue_pending(self.sessions, self.worker.submit, quiet=True, skip=set(handed))
        except SQLAlchemyError:
            LOGGER.exception("completion check failed; will retry")

    def kick_senders(self) -> None:
        """Run the outbox and triage senders now instead of at their next tick."""
        for task in (DELIVER_RESULTS, SEND_TRIAGE):
            self._tick(task)

    def _tick(self, task: str) -> None:
        """Defer one run of a cluster-wide tick (a no-op while one already waits)."""
        try:
            self.queue.defer(tick_job(task))
        except (SQLAlchemyError, RuntimeError) as exc:
            LOGGER.warning("cannot queue %s: %s", task, exc)

    def start(self) -> None:
        """Start the parts in order: scoring processes (warming up), job runner (with the backlog re-queued),
        ticks, listener, HTTP."""
        if self.pool is not None:
            self.pool.warm()
        self.runner.start()
        self.metrics.track_queue(self.worker.backlog)
        # On SQLite this is the only process: a version a job had claimed when it stopped is orphaned. On
        # PostgreSQL another process may hold it; the stalled-job check hands it over if that one died.
        embedded = isinstance(self.queue, MemoryQueue)
        requeue_pending(self.sessions, self.worker.submit, taken=embedded)
        settings = self.settings
        self._every(settings.completion_interval, COMPLETE_STUDIES)
        self._every(settings.delivery_interval, DELIVER_RESULTS)
        self._every(settings.triage_interval, SEND_TRIAGE)
        if settings.retention_days is not None:
            self._every(settings.retention_interval, RETENTION)
        if not embedded:
            self._every(settings.job_stalled_after / 2, RETRY_STALLED)
        self.scheduler.start()
        if self.receive:
            self.scp.start()
        if self.http is not None:
            self.http.start()

    def _every(self, interval: float, task: str) -> None:
        self.scheduler.add_job(
            self._tick,
            "interval",
            args=[task],
            seconds=interval,
            id=task,
            max_instances=1,
            coalesce=True,
            next_run_time=utc_now(),
        )

    def stop(self) -> None:
        """Stop accepting associations, drain in-flight writes, stop the ticks, let running jobs finish (up to
        the shutdown grace), stop the scoring processes, close the database.

        Safe to call twice, and on a daemon whose start failed part-way.
        """
        if self.http is not None:
            self.http.stop()
        self.scp.stop(grace=self.settings.shutdown_grace)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.runner.stop(timeout=self.settings.shutdown_grace + 30)
        if self.pool is not None:
            self.pool.close()
        self.queue.close()
        self.engine.dispose()
        if self.lock is not None:
            self.lock.release()
        LOGGER.info("fracwatch stopped")


class Daemon:
    """fracwatch serve: receive, track and hand over studies until told to stop (``receive=False``: a worker
    host, ``fracwatch worker``, that only runs jobs)."""

    def __init__(
        self,
        settings: Settings,
        processor: StudyProcessor | None = None,
        clock: Clock = utc_now,
        bundle: Bundle | None = None,
        processor_factory: str | None = None,
        receive: bool = True,
    ) -> None:
        self.settings = settings
        self._receive = receive
        self._clock = clock
        self._processor = processor
        self._factory = processor_factory
        self._bundle = bundle
        self._stopping = threading.Event()

    def start(self) -> RunningDaemon:
        """Load the model, open the database, reconcile the spool, then start jobs, listener, HTTP."""
        settings = self.settings
        if not self._receive and db.is_sqlite(settings.database_url):
            raise DatabaseError(
                "a worker host shares the receivers' PostgreSQL database; "
                f"{settings.database_url} is SQLite (fracwatch serve scores it with --workers)"
            )
        if self._receive and settings.reuse_port and db.is_sqlite(settings.database_url):
            raise DatabaseError(
                "receivers sharing a port (reuse_port) share one PostgreSQL database; "
                f"{settings.database_url} is SQLite, which takes one daemon (set db_url, or drop --reuse-port)"
            )
        bundle = self._bundle
        if self._processor is None and bundle is None:
            bundle = load_bundle(settings.model_path)  # here too: a bad bundle stops the start, in one line
            LOGGER.info("model %s %s (Device UID %s)", bundle.card.name, bundle.card.version, bundle.card.device_uid)
            runtimes.check(bundle, settings.runtime, select_device(settings.device))
        refuse_missing_database(settings)
        lock = db.lock_database(settings.database_url)  # a second daemon on one SQLite file is refused
        try:
            engine = open_database(settings)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        try:
            running = self._assemble(engine, bundle)
        except BaseException:
            engine.dispose()
            if lock is not None:
                lock.release()
            raise
        running.lock = lock
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
        url = engine.url.render_as_string(hide_password=True)
        datadir.claim(settings.data_dir, sessions, url)
        Spool(settings.results_dir).prepare()
        if self._receive:  # the receivers own the spool's files; a worker host only reads them
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
        queue = open_queue(engine, sessions)
        pool, score, processes = self._scoring(metrics)
        on_loop = (lambda loop: setattr(queue, "loop", loop)) if isinstance(queue, MemoryQueue) else _no_loop
        runner = JobRunner(
            queue.app,
            # enough scoring jobs at once for every process's batch: the sandbox coalesces those that wait
            {SCORING_QUEUE: processes * (pool.batch_studies if pool is not None else 1), TICKS_QUEUE: 1},
            on_loop=on_loop,
            poll_interval=MEMORY_POLL if isinstance(queue, MemoryQueue) else DATABASE_POLL,
            shutdown_grace=settings.shutdown_grace,
            heartbeat=settings.job_stalled_after / 3,
            stalled_after=settings.job_stalled_after,
        )
        scp = StorageSCP(listener_options(settings), spool, DatabaseSink(sessions, metrics))
        running = RunningDaemon(
            settings,
            engine,
            sessions,
            metrics,
            queue,
            ScoringQueue(queue, lambda: runner.alive),
            runner,
            pool,
            build_scheduler(),
            deliverer,
            triage,
            scp,
            None,
            bundle,
            clock,
            receive=self._receive,
        )
        handlers = Handlers(
            sessions,
            queue,
            score,
            clock,
            metrics,
            settings.job_attempts,
            settings.job_retry_wait,
            stalled_after=settings.job_stalled_after,
            ticks={
                COMPLETE_STUDIES: running.detect_once,
                DELIVER_RESULTS: running.deliver_once,
                SEND_TRIAGE: running.send_triage_once,
                RETENTION: running.purge_once,
            },
        )
        register(queue.app, handlers)
        if settings.http_enabled and self._receive:
            scorer = _upload_scorer(bundle, settings.runtime)
            web = WebContext(sessions, settings, metrics, running.readiness, scorer, clock)
            running.http = HttpServer(create_app(web), settings.http_host, settings.http_port)
        return running

    def _scoring(self, metrics: Metrics) -> tuple[ScoringPool | None, Score, int]:
        """The scoring pool (``workers`` processes), or a processor run in this process (tests only)."""
        settings = self.settings
        processor = self._processor
        if processor is not None:
            return None, _inline(processor), 1
        if settings.workers == 0:
            LOGGER.warning("workers = 0: this process receives only; another host's `fracwatch worker` must score")
            return None, _unscored, 0
        batch = settings.batch_studies(select_device(settings.device).type)
        options = SandboxOptions(
            settings.workers, settings.job_timeout, settings.worker_memory_mb, self._factory, batch_studies=batch
        )
        pool = ScoringPool(settings, options, on_batch=metrics.scoring_batches.observe)
        return pool, pool.score, settings.workers

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


def _no_loop(_loop: object) -> None:
    pass


def _inline(processor: StudyProcessor) -> Score:
    def score(hand_over: HandOver, _now: datetime) -> None:
        try:
            processor([hand_over])
        except Exception as exc:
            raise ScoringFailed(f"{type(exc).__name__}: {exc}") from exc

    return score


# How often an idle Procrastinate worker looks for jobs besides its notifications. In memory a look costs
# nothing, and a wake-up can be missed while the worker is busy with a tick (bench/e2e.py at 3000 x 2500:
# completion -> SR acknowledged p50 0.63 s at 1 s, 0.46 s at 0.05 s); on PostgreSQL every look is a query per
# worker, and LISTEN/NOTIFY carries the rest.
MEMORY_POLL, DATABASE_POLL = 0.05, 1.0


def _unscored(hand_over: HandOver, _now: datetime) -> None:
    raise ScoringFailed("this process has no scoring workers")


def _upload_scorer(bundle: Bundle | None, runtime: str) -> ImageScorer | None:
    """The web pages' Grad-CAM runs on a copy of the network of its own, off the worker's."""
    if bundle is None:
        return None
    return ImageScorer(Bundle(bundle.path, bundle.card, copy.deepcopy(bundle.network)), runtime=runtime)
