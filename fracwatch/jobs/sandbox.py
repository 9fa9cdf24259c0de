"""The scoring sandbox: study versions are scored in separate processes (Pebble's process pool), never in the
process that runs the DICOM listener.

Each process loads the bundle and opens the database once, then takes one batch of study versions at a time
(``jobs.batching``: those that waited while every process was busy, up to ``max_batch_studies``, share the
network's batches; a study that finds a process free goes alone, at once). A batch that runs past its time limit
(``job_timeout`` a study) has its process killed; a process that dies (a decoder's segfault, the kernel's OOM
killer, the per-process address-space limit) fails only its own batch, whose studies then run again one by one so
that only the bad one fails. Either way the pool starts a fresh process and the caller gets a
:class:`ScoringFailed` with the reason, to retry or dead-letter.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import resource
import signal
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pebble import ProcessExpired, ProcessPool
from sqlalchemy.orm import sessionmaker

from fracwatch.config import Settings
from fracwatch.dicom import j2k
from fracwatch.dicom.spool import Spool
from fracwatch.jobs.batching import Batcher, Outcome
from fracwatch.logs import configure_logging
from fracwatch.model.bundle import Bundle, load_bundle
from fracwatch.model.runtimes import predictor_for
from fracwatch.service.channels import triage_endpoints
from fracwatch.service.lifecycle import Clock, StudyProcessor
from fracwatch.service.scoring import StudyScorer
from fracwatch.service.triage import TriagePlanner
from fracwatch.store import db
from fracwatch.store.instances import HandOver

LOGGER = logging.getLogger(__name__)

ProcessorFactory = Callable[[Settings, sessionmaker[Any], Bundle, Clock], StudyProcessor]
"""Builds a process's scorer; the default is :func:`build_scorer`. Tests name another (``module:function``)."""


class ScoringFailed(Exception):
    """A study version's scoring job failed; ``reason`` is one line for the dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def build_scorer(settings: Settings, sessions: sessionmaker[Any], bundle: Bundle, clock: Clock) -> StudyProcessor:
    """The daemon's scorer: the bundle's network on this process's device, writing SRs into the results spool."""
    predictor = predictor_for(bundle, settings.device, settings.torch_threads, settings.batch_size, settings.runtime)
    reports = Spool(settings.results_dir)
    reports.prepare()
    return StudyScorer(
        sessions,
        bundle,
        predictor,
        reports,
        [str(d) for d in settings.destinations],
        clock=clock,
        overlays=settings.overlays,
        after_save=TriagePlanner(settings.triage_categories, triage_endpoints(settings)),
    )


@dataclass(frozen=True)
class SandboxOptions:
    """How the pool's processes are made: how many, each one's limits, and who builds their scorer."""

    processes: int
    timeout: float  # a study's; a batch of n studies gets n times this
    memory_mb: int | None
    factory: str | None = None  # "module:function" (a ProcessorFactory); None = build_scorer
    batch_studies: int = 1  # the most study versions one process scores together


@dataclass(frozen=True)
class _Request:
    hand_over: HandOver
    now: datetime


class ScoringPool:
    """``processes`` scoring processes (started on the first job, restarted after a crash or a time-out), fed in
    batches of up to ``batch_studies`` study versions; ``on_batch`` hears each batch's size."""

    def __init__(
        self, settings: Settings, options: SandboxOptions, on_batch: Callable[[int], None] = lambda _size: None
    ) -> None:
        self._options = options
        threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // max(1, options.processes))
        self._pool = ProcessPool(
            max_workers=max(1, options.processes),
            initializer=_initialise,
            initargs=(_portable(settings), options.factory, threads, options.memory_mb),
            context=multiprocessing.get_context("spawn"),  # never fork a process that holds threads and sockets
        )
        self._batcher: Batcher[_Request] = Batcher(
            self._launch, options.processes, options.batch_studies, self._describe, on_batch
        )

    @property
    def batch_studies(self) -> int:
        """The most study versions one process scores together."""
        return self._options.batch_studies

    def warm(self) -> None:
        """Start the processes now, in the background: each loads torch and the bundle (seconds) before the
        first study arrives instead of while it waits (bench/e2e.py at 3000 x 2500: p95 completion -> SR
        3.6 s without this, 1.5 s with it)."""
        self._pool.schedule(_ready)

    def score(self, hand_over: HandOver, now: datetime) -> None:
        """Score one study version in a pool process, in a batch with others waiting as it does; raise
        :class:`ScoringFailed` if it does not finish."""
        reason = self._batcher.submit(_Request(hand_over, now)).result()
        if reason is not None:
            raise ScoringFailed(reason)

    def _launch(self, requests: list[_Request]) -> Future[list[Outcome]]:
        studies = [(r.hand_over.study_instance_uid, r.hand_over.version) for r in requests]
        now = max(r.now for r in requests)
        future: Future[list[Outcome]] = self._pool.schedule(
            _score, args=(studies, now.isoformat()), timeout=self._options.timeout * len(requests)
        )
        return future

    def _describe(self, exc: BaseException) -> str:
        """The dead letter's line for a lone study version's failed job."""
        if isinstance(exc, FutureTimeout):
            return f"scoring ran past the {self._options.timeout:g} s time limit; its process was killed"
        if isinstance(exc, ProcessExpired):
            return _death(exc.exitcode)
        return failure_reason(exc, self._options.memory_mb)

    def close(self) -> None:
        """Stop the processes (a job still running is killed; its study is re-scored at the next start, as are
        those still waiting for a process)."""
        self._batcher.close()
        self._pool.stop()  # type: ignore[no-untyped-call]
        self._pool.join(timeout=10)


def _portable(settings: Settings) -> Settings:
    """The same values on the plain ``Settings`` class (``load_settings`` builds a local subclass that the
    process start cannot pickle); already validated, so not validated again."""
    return Settings.model_construct(**{name: getattr(settings, name) for name in Settings.model_fields})


def failure_reason(exc: BaseException, memory_mb: int | None) -> str:
    """One line for a scorer's exception."""
    if isinstance(exc, MemoryError):
        return f"out of memory (the scoring process's limit is {memory_mb} MB)"
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the scoring process died ({name})"
    return f"the scoring process exited with status {exitcode}"


# --- inside a pool process ---------------------------------------------------------------------------------

_state: dict[str, Any] = {}
SCORING_NICENESS = 10


def _initialise(settings: Settings, factory: str | None, threads: int, memory_mb: int | None) -> None:
    """Once per pool process: limits, logging, the bundle, the database. A failure is kept and reported by every
    job this process is given (a clear reason in the dead letter), instead of a process that dies at birth."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the daemon stops the pool
    configure_logging(settings.log_level)  # as the daemon's own
    _state["memory_mb"] = memory_mb
    try:
        # Scoring yields the CPU to the listener and HTTP in the daemon's own process (a receiver that
        # stalls makes the PACS queue or time out; a score a moment later costs nothing).
        os.nice(SCORING_NICENESS)
        if memory_mb is not None:
            limit = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads)
        j2k.use_threads(threads)  # OpenJPEG's reduced-resolution decode: half the time on two threads
        # numpy's OpenBLAS (the gate's SVD, any linear algebra) otherwise starts a thread per core that spins
        # beside torch's: measured here, 64 studies of 1024² DX, 7.1 -> 15.8 images/s with one worker.
        threadpool_limits(limits=1, user_api="blas")
        engine = db.make_engine(settings.database_url, settings.data_dir)
        sessions = db.session_factory(engine)
        bundle = load_bundle(settings.model_path)
        build: ProcessorFactory = build_scorer
        if factory is not None:
            module, _, name = factory.partition(":")
            build = getattr(importlib.import_module(module), name)
        _state["processor"] = build(settings, sessions, bundle, _job_now)
        _rehearse(_state["processor"])
    except Exception as exc:
        _state["error"] = f"the scoring process could not start: {type(exc).__name__}: {exc}"
        logging.getLogger(__name__).exception("scoring process start failed")


def _rehearse(processor: StudyProcessor) -> None:
    """The scorer's start-up rehearsal (``StudyScorer.rehearse``), where it has one; a failed rehearsal is logged
    and the process still scores (a real study's failure is then recorded as its own)."""
    rehearse = getattr(processor, "rehearse", None)
    if rehearse is None:
        return
    _state["now"] = datetime.now(UTC)
    try:
        rehearse()
    except Exception:
        logging.getLogger(__name__).exception("the scoring process's start-up rehearsal failed")


def _job_now() -> datetime:
    now: datetime = _state["now"]
    return now


def _ready() -> bool:
    """A no-op job: the process exists and has run its initialiser (True unless that failed)."""
    return "error" not in _state


def _score(studies: list[tuple[str, int]], now: str) -> list[Outcome]:
    """Score a batch of study versions together; if that fails, each one alone (the outcome of each: None, or
    why it failed). A lone study's failure is raised, for the pool to translate."""
    if "error" in _state:
        raise RuntimeError(_state["error"])
    _state["now"] = datetime.fromisoformat(now)
    hand_overs = [HandOver(study, version) for study, version in studies]
    processor: StudyProcessor = _state["processor"]
    try:
        processor(hand_overs)
    except Exception:
        if len(hand_overs) == 1:
            raise
        LOGGER.warning("a batch of %d study versions failed; each is scored again alone", len(hand_overs),
                       exc_info=True)  # fmt: skip
    else:
        return [None] * len(hand_overs)
    return [_score_alone(processor, hand_over) for hand_over in hand_overs]


def _score_alone(processor: StudyProcessor, hand_over: HandOver) -> Outcome:
    """One study version of a failed batch (one the batch had already scored is skipped by its claim)."""
    try:
        processor([hand_over])
    except Exception as exc:
        LOGGER.warning("study %s version %d failed alone", hand_over.study_instance_uid, hand_over.version)
        return failure_reason(exc, _state.get("memory_mb"))
    return None
