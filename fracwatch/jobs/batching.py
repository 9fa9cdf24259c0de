"""Dynamic batching of scoring requests across studies, bounded for latency.

A study version handed to the :class:`Batcher` while one of its ``lanes`` (scoring processes) is free leaves at
once, alone: nothing ever waits for a batch to fill. Those handed over while every lane is busy wait, and the
next lane to come free takes up to ``max_items`` of them together (one network pass over all their images and
tiles). So a study waits at most as long as the batches ahead of it, and batches grow only when the machine is
behind, which is when sharing the network's batches pays (a GPU above all).

A batch that fails as a whole (its process killed by a crash or the time limit) is split: each of its studies
runs again alone, ahead of those still waiting, so one bad study fails only itself.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

LOGGER = logging.getLogger(__name__)

T = TypeVar("T")
Outcome = str | None
"""What became of one item: None when it was done, else one line saying why it failed."""

Launch = Callable[[list[T]], "Future[list[Outcome]]"]
"""Start one batch; its future gives an outcome per item, in order, or raises when the batch failed as a whole."""


@dataclass(frozen=True)
class _Waiting(Generic[T]):
    item: T
    outcome: Future[Outcome] = field(default_factory=Future, compare=False)
    alone: bool = False  # split out of a batch that failed as a whole: runs by itself


class Batcher(Generic[T]):
    """At most ``lanes`` batches in flight, each of at most ``max_items`` items; ``describe`` turns a lone
    item's failure into its reason, ``on_batch`` hears each batch's size as it starts."""

    def __init__(
        self,
        launch: Launch[T],
        lanes: int,
        max_items: int,
        describe: Callable[[BaseException], str],
        on_batch: Callable[[int], None] = lambda _size: None,
    ) -> None:
        self._launch = launch
        self._lanes = max(1, lanes)
        self._max = max(1, max_items)
        self._describe = describe
        self._on_batch = on_batch
        self._lock = threading.Lock()
        self._waiting: deque[_Waiting[T]] = deque()
        self._busy = 0
        self._closed = False

    def submit(self, item: T) -> Future[Outcome]:
        """Queue ``item``; its future gives its outcome once its batch has run."""
        waiting: _Waiting[T] = _Waiting(item)
        with self._lock:
            if self._closed:
                waiting.outcome.set_result("the scoring pool was stopped")
                return waiting.outcome
            self._waiting.append(waiting)
            batches = self._take()
        self._start_all(batches)
        return waiting.outcome

    def close(self, reason: str = "the scoring pool stopped before this study's turn") -> None:
        """Take no more items; those still waiting fail with ``reason`` (batches in flight end as they end)."""
        with self._lock:
            self._closed = True
            left, self._waiting = list(self._waiting), deque()
        for waiting in left:
            waiting.outcome.set_result(reason)

    def _take(self) -> list[list[_Waiting[T]]]:
        """The batches free lanes can start now (called holding the lock)."""
        batches = []
        while self._waiting and self._busy < self._lanes and not self._closed:
            batch = [self._waiting.popleft()]
            if not batch[0].alone:
                while self._waiting and len(batch) < self._max and not self._waiting[0].alone:
                    batch.append(self._waiting.popleft())
            self._busy += 1
            batches.append(batch)
        return batches

    def _start_all(self, batches: Sequence[list[_Waiting[T]]]) -> None:
        for batch in batches:
            self._start(batch)

    def _start(self, batch: list[_Waiting[T]]) -> None:
        self._on_batch(len(batch))
        try:
            future = self._launch([waiting.item for waiting in batch])
        except Exception as exc:  # the pool refused it (stopped): a failure like any other
            failed: Future[list[Outcome]] = Future()
            failed.set_exception(exc)
            self._finished(batch, failed)
            return
        future.add_done_callback(lambda done: self._finished(batch, done))

    def _finished(self, batch: list[_Waiting[T]], done: Future[list[Outcome]]) -> None:
        split: list[_Waiting[T]] = []
        try:
            outcomes = done.result()
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for a batch of {len(batch)}")
        except BaseException as exc:  # a time-out, a dead process, a cancelled future: the batch as a whole
            if len(batch) == 1:
                batch[0].outcome.set_result(self._describe(exc))
            else:
                LOGGER.warning("a batch of %d study versions failed as a whole (%s); each runs again alone",
                               len(batch), self._describe(exc))  # fmt: skip
                split = [replace(waiting, alone=True) for waiting in batch]
        else:
            for waiting, outcome in zip(batch, outcomes, strict=True):
                waiting.outcome.set_result(outcome)
        with self._lock:
            self._busy -= 1
            if self._closed:
                batches: list[list[_Waiting[T]]] = []
                closing = split
            else:
                self._waiting.extendleft(reversed(split))  # they have waited longest
                batches, closing = self._take(), []
        for waiting in closing:
            waiting.outcome.set_result("the scoring pool was stopped")
        self._start_all(batches)
