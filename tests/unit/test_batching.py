"""The scoring batcher: a study finding a lane free goes alone at once; studies that wait while every lane is busy
leave together (up to the cap); a batch failing as a whole is split so only its bad study fails."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from fracwatch.jobs.batching import Batcher, Outcome


class Lanes:
    """A stand-in for the process pool: records each batch launched and lets the test finish it."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.futures: list[Future[list[Outcome]]] = []
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def launch(self, items: list[str]) -> Future[list[Outcome]]:
        future: Future[list[Outcome]] = Future()
        with self.lock:
            self.batches.append(list(items))
            self.futures.append(future)
        return future

    def finish(self, index: int, outcomes: list[Outcome] | None = None, error: BaseException | None = None) -> None:
        future = self.futures[index]
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcomes if outcomes is not None else [None] * len(self.batches[index]))


def batcher(lanes: Lanes, count: int = 1, cap: int = 3) -> Batcher[str]:
    return Batcher(lanes.launch, count, cap, describe=lambda exc: f"failed: {exc}", on_batch=lanes.sizes.append)


def test_a_study_finding_a_lane_free_goes_alone_at_once() -> None:
    lanes = Lanes()
    first = batcher(lanes).submit("a")
    assert lanes.batches == [["a"]]  # launched in submit itself: no wait for company
    lanes.finish(0)
    assert first.result(timeout=1) is None


def test_studies_waiting_on_a_busy_lane_leave_together_up_to_the_cap() -> None:
    lanes = Lanes()
    queue = batcher(lanes, count=1, cap=3)
    outcomes = {item: queue.submit(item) for item in "abcdef"}
    assert lanes.batches == [["a"]]  # b..f wait: the one lane is busy
    lanes.finish(0)
    assert lanes.batches[1] == ["b", "c", "d"]  # the cap
    lanes.finish(1, [None, "bad image", None])
    assert lanes.batches[2] == ["e", "f"]
    lanes.finish(2)
    assert {item: future.result(timeout=1) for item, future in outcomes.items()} == {
        "a": None, "b": None, "c": "bad image", "d": None, "e": None, "f": None,
    }  # fmt: skip
    assert lanes.sizes == [1, 3, 2]


def test_two_lanes_run_two_batches_at_once() -> None:
    lanes = Lanes()
    queue = batcher(lanes, count=2, cap=4)
    for item in "abcde":
        queue.submit(item)
    assert lanes.batches == [["a"], ["b"]]
    lanes.finish(1)
    assert lanes.batches[2] == ["c", "d", "e"]


def test_a_batch_failing_as_a_whole_runs_each_study_again_alone_before_the_others() -> None:
    lanes = Lanes()
    queue = batcher(lanes, count=1, cap=3)
    futures = {item: queue.submit(item) for item in "abcde"}
    lanes.finish(0)  # a
    lanes.finish(1, error=RuntimeError("process died"))  # b, c, d together: the process was killed
    assert lanes.batches[2] == ["b"]  # split, and ahead of e, which waited less
    lanes.finish(2)
    assert lanes.batches[3] == ["c"]
    lanes.finish(3, error=RuntimeError("process died"))  # c is the bad one
    assert lanes.batches[4] == ["d"]
    lanes.finish(4)
    assert lanes.batches[5] == ["e"]  # e may join no split study's batch, and goes once they are done
    lanes.finish(5)
    assert futures["c"].result(timeout=1) == "failed: process died"
    assert [futures[item].result(timeout=1) for item in "abde"] == [None] * 4


def test_a_launch_the_pool_refuses_fails_that_batch_and_the_next_still_runs() -> None:
    calls: list[list[str]] = []

    def launch(items: list[str]) -> Future[list[Outcome]]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("pool is not running")
        done: Future[list[Outcome]] = Future()
        done.set_result([None] * len(items))
        return done

    queue: Batcher[str] = Batcher(launch, 1, 2, describe=lambda exc: str(exc))
    assert queue.submit("a").result(timeout=1) == "pool is not running"
    assert queue.submit("b").result(timeout=1) is None


def test_closing_fails_the_studies_still_waiting_and_takes_no_more() -> None:
    lanes = Lanes()
    queue = batcher(lanes)
    running = queue.submit("a")
    waiting = queue.submit("b")
    queue.close()
    assert waiting.result(timeout=1) == "the scoring pool stopped before this study's turn"
    assert queue.submit("c").result(timeout=1) == "the scoring pool was stopped"
    lanes.finish(0)
    assert running.result(timeout=1) is None
    assert lanes.batches == [["a"]]


def test_an_outcome_count_that_does_not_match_the_batch_fails_it_as_a_whole() -> None:
    lanes = Lanes()
    queue = batcher(lanes, count=1, cap=2)
    queue.submit("a")
    b, c = queue.submit("b"), queue.submit("c")
    lanes.finish(0)
    lanes.finish(1, [None])  # one outcome for two studies
    assert lanes.batches[2:] == [["b"]]
    lanes.finish(2)
    lanes.finish(3)
    assert b.result(timeout=1) is None and c.result(timeout=1) is None


@pytest.mark.parametrize("count", [1, 2])
def test_many_threads_submitting_at_once_each_get_their_own_outcome(count: int) -> None:
    def launch(items: list[str]) -> Future[list[Outcome]]:
        done: Future[list[Outcome]] = Future()
        timer = threading.Timer(0.01, lambda: done.set_result([f"done {item}" for item in items]))
        timer.start()
        return done

    sizes: list[int] = []
    queue: Batcher[str] = Batcher(launch, count, 4, describe=str, on_batch=sizes.append)
    results: dict[str, Outcome] = {}

    def submit(item: str) -> None:
        results[item] = queue.submit(item).result(timeout=10)

    threads = [threading.Thread(target=submit, args=(f"s{i}",)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {f"s{i}": f"done s{i}" for i in range(40)}
    assert sum(sizes) == 40 and max(sizes) <= 4
