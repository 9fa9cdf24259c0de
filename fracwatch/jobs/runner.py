"""The job runner: Procrastinate workers on an event loop of their own, in a thread of this process.

One worker per queue so that a long scoring job never delays a tick: ``scoring`` runs as many jobs at once as
this host's scoring processes take in their batches, ``ticks`` one at a time. The scoring jobs themselves wait on
the sandbox's processes; the runner only dispatches. Procrastinate runs a synchronous task in a thread of the
loop's default executor, so that executor has a thread for every job that may run at once (asyncio's default,
the cores + 4, would cap the jobs in flight below the concurrency asked for).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import procrastinate

LOGGER = logging.getLogger(__name__)


SPARE_THREADS = 4  # besides one per job in flight: Procrastinate's own calls into threads


class JobRunner:
    """Run ``app``'s workers for ``queues`` ({queue: concurrency}) until :meth:`stop`."""

    def __init__(
        self,
        app: procrastinate.App,
        queues: dict[str, int],
        on_loop: Callable[[asyncio.AbstractEventLoop], None] = lambda _loop: None,
        poll_interval: float = 1.0,
        shutdown_grace: float = 30.0,
        heartbeat: float = 5.0,
        stalled_after: float = 30.0,
    ) -> None:
        self._app = app
        self._queues = {queue: count for queue, count in queues.items() if count > 0}
        self._on_loop = on_loop
        self._poll = poll_interval
        self._grace = shutdown_grace
        self._heartbeat = heartbeat
        self._stalled_after = stalled_after
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fracwatch-jobs", daemon=True)
        self._started = threading.Event()
        self._main: asyncio.Future[Any] | None = None
        self._error: BaseException | None = None

    @property
    def alive(self) -> bool:
        """True while the runner's thread runs."""
        return self._thread.is_alive()

    def start(self, timeout: float = 30.0) -> None:
        """Start the thread and wait until the queue's connections are open."""
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the job runner did not start: {self._error!r}")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        threads = sum(self._queues.values()) + SPARE_THREADS
        self._loop.set_default_executor(ThreadPoolExecutor(threads, thread_name_prefix="fracwatch-job"))
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(), or logged when it happens later
            self._error = exc
            if self._started.is_set():
                LOGGER.exception("the job runner stopped")
        finally:
            self._started.set()
            self._loop.close()

    async def _serve(self) -> None:
        async with self._app.open_async():
            self._on_loop(self._loop)
            workers = [
                self._app.run_worker_async(
                    queues=[queue],
                    name=f"fracwatch-{queue}",
                    concurrency=concurrency,
                    install_signal_handlers=False,
                    fetch_job_polling_interval=self._poll,
                    abort_job_polling_interval=self._poll,
                    shutdown_graceful_timeout=self._grace,
                    update_heartbeat_interval=self._heartbeat,
                    stalled_worker_timeout=self._stalled_after,
                    delete_jobs="successful",
                )
                for queue, concurrency in self._queues.items()
            ]
            main: asyncio.Future[Any] = (
                asyncio.gather(*workers) if workers else asyncio.get_running_loop().create_future()
            )
            self._main = main
            self._started.set()
            with contextlib.suppress(asyncio.CancelledError):
                await main

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking jobs, let running ones finish (up to the shutdown grace), close the connections."""
        if not self._thread.is_alive():
            return
        main = self._main
        if main is not None:
            self._loop.call_soon_threadsafe(main.cancel)
        self._thread.join(timeout)
        if self._thread.is_alive():
            LOGGER.warning("the job runner did not stop within %.0f s", timeout)
