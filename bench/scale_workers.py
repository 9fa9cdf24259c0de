"""Scaling scoring across worker processes, and receiving while scoring runs (issue 34).

    python bench/scale_workers.py [--studies 24] [--size 1024] [--ingest-images 40]

1. Scoring throughput: ``fracwatch serve --workers N`` for N = 1 and 2, a burst of 2-image DX studies sent back
   to back within the quiet period, so that they complete together; images per second from the first study's
   completion (its ``completed_at``) to the last SR acknowledged. Prints the 2-worker / 1-worker
   ratio (target ≥ 1.6 on 2 cores).
2. Receiving while scoring: one daemon (``--workers 2``). A study of ``--ingest-images`` images is received while
   nothing scores (alone); it completes and its scoring starts; a second study of the same size is received
   while the first is being scored. Prints the ratio of the two receive rates (target ≥ 0.8).

Needs DCMTK (storescu). Not a test: figures depend on the machine; the ratios come from one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import Receiver, completed_at, make_study, send
from ingest import free_port, make_files, wait_echo

QUIET = 10.0  # stable_after of the throughput runs: the whole burst is received before the first completes
MODEL = Path(__file__).resolve().parents[1] / "models" / "fracwatch-drr"


def serve(data_dir: Path, port: int, receiver: Receiver, workers: int, stable_after: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FRACWATCH_COMPLETION_INTERVAL": "0.25", "FRACWATCH_DELIVERY_INTERVAL": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fracwatch", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
         "--port", str(port), "--no-http", "--workers", str(workers), "--stable-after", str(stable_after),
         "--model", str(MODEL), "--destination", f"PACS@127.0.0.1:{receiver.port}", "--log-level", "WARNING"],
        env=env,
    )  # fmt: skip
    wait_echo(port, "FRACWATCH")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()


def warm_up(port: int, receiver: Receiver, work: Path, size: int, workers: int) -> None:
    """One study per worker first, so each scoring process has loaded the model before timing starts."""
    work.mkdir(parents=True, exist_ok=True)
    studies = [make_study(work, size, 9000 + index) for index in range(workers)]
    for _, paths in studies:
        send(paths, port)
    receiver.wait({uid for uid, _ in studies}, timeout=300)


def scoring_rate(work: Path, workers: int, studies: int, size: int) -> float:
    receiver = Receiver()
    port = free_port()
    data_dir = work / f"data-{workers}"
    proc = serve(data_dir, port, receiver, workers, stable_after=QUIET)
    try:
        warm_up(port, receiver, work / f"warm-{workers}", size, workers)
        (work / f"burst-{workers}").mkdir()
        burst = [make_study(work / f"burst-{workers}", size, seed) for seed in range(studies)]
        sending = time.time()
        for _, paths in burst:
            send(paths, port)
        if time.time() - sending > QUIET:
            print(f"  (sending took {time.time() - sending:.1f} s, longer than the quiet period)")
        uids = {uid for uid, _ in burst}
        receiver.wait(uids, timeout=1800)
        completed = completed_at(data_dir)
        started = min(completed[uid] for uid in uids)
        elapsed = max(receiver.arrivals[uid] for uid in uids) - started
    finally:
        stop(proc)
        receiver.server.shutdown()
    return 2 * studies / elapsed


def receive_seconds(files: list[Path], port: int) -> float:
    started = time.monotonic()
    send(files, port)
    return time.monotonic() - started


def ingest_while_scoring(work: Path, images: int, size: int) -> tuple[float, float]:
    receiver = Receiver()
    port = free_port()
    proc = serve(work / "data-ingest", port, receiver, 2, stable_after=0.5)
    try:
        warm_up(port, receiver, work / "warm-ingest", size, 2)
        first = make_files(work / "first", images, size)
        second = make_files(work / "second", images, size)
        alone = receive_seconds(first, port)
        time.sleep(1.5)  # the first batch completes; its scoring runs while the second arrives
        busy = receive_seconds(second, port)
    finally:
        stop(proc)
        receiver.server.shutdown()
    return images / alone, images / busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--size", type=int, default=1024, help="image side, pixels")
    parser.add_argument("--ingest-images", type=int, default=40)
    parser.add_argument("--part", choices=["all", "scoring", "ingest"], default="all", help="which measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.part != "ingest":
            scoring(work, args.studies, args.size)
        if args.part != "scoring":
            ingest(work, args.ingest_images, args.size)


def scoring(work: Path, studies: int, size: int) -> None:
    one = scoring_rate(work, 1, studies, size)
    two = scoring_rate(work, 2, studies, size)
    print(f"scoring, {size}² DX, {studies} 2-image studies (cores: {os.cpu_count()})")
    print(f"  1 worker : {one:6.2f} images/s")
    print(f"  2 workers: {two:6.2f} images/s   ratio {two / one:.2f} (target >= 1.6)")


def ingest(work: Path, images: int, size: int) -> None:
    alone, busy = ingest_while_scoring(work, images, size)
    print(f"receiving {images} images of {size}²")
    print(f"  alone          : {alone:6.1f} images/s")
    print(f"  while scoring  : {busy:6.1f} images/s   ratio {busy / alone:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
