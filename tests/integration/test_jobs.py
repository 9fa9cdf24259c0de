"""The job engine: a bad study is contained and dead-lettered while every other one is scored; many daemons on
one PostgreSQL database score each study version once and send each SR once, through a worker killed mid-job."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select, text, update

from fracwatch.cli import cli
from fracwatch.config import Settings
from fracwatch.daemon import Daemon, RunningDaemon
from fracwatch.errors import DatabaseError
from fracwatch.jobs.queue import SCORING_QUEUE, MemoryQueue, score_job
from fracwatch.store.instances import HandOver
from fracwatch.store.models import Study, StudyResult
from tests import dicomgen, faults
from tests.conftest import PG_ADMIN_URL, PHANTOM_MODEL, STARTED, FakeClock, free_port, send_files
from tests.integration.test_triage import webhook_receiver
from tests.pacs import running_pacs
from tests.serveproc import ServeProcess, serve_args

pytestmark = pytest.mark.timeout(300)


def study(directory: Path, accession: str, images: int = 1, fractured: bool = False) -> list[Path]:
    ids = dicomgen.StudyIds(accession=accession)
    series = str(generate_uid())
    directory.mkdir(parents=True, exist_ok=True)
    return [
        dicomgen.save(
            dicomgen.phantom_image(ids, seed=seed, fractured=fractured, series_uid=series),
            directory / f"{accession}-{seed}.dcm",
        )
        for seed in range(images)
    ]


def states(daemon: RunningDaemon) -> dict[str, tuple[str, str | None]]:
    """Accession → (state, failure reason)."""
    with daemon.sessions() as session:
        rows = session.execute(select(Study.accession_number, Study.state, Study.failure_reason)).all()
    return {accession: (state, reason) for accession, state, reason in rows}


@pytest.fixture
def faulty_daemon(make_settings: Callable[..., Settings], clock: FakeClock) -> Iterator[Callable[..., RunningDaemon]]:
    started: list[RunningDaemon] = []

    def start(**overrides: Any) -> RunningDaemon:
        # batches of up to 4 (a CPU's default is 1): a bad study shares a batch with good ones, which is split
        settings = make_settings(job_timeout=8, job_attempts=2, job_retry_wait=1, max_batch_studies=4, **overrides)
        daemon = Daemon(settings, clock=clock, processor_factory="tests.faults:faulty").start()
        started.append(daemon)
        STARTED.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
        STARTED.remove(daemon)


def test_a_crashing_hanging_or_raising_study_is_dead_lettered_and_the_others_scored(
    faulty_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock, db_url: str
) -> None:
    with running_pacs() as pacs:
        daemon = faulty_daemon(db_url=db_url, destinations=[pacs.destination])
        port = daemon.scp.address[1]
        order = ["GOOD-1", faults.CRASH, faults.HANG, faults.RAISE, "GOOD-2"]
        for accession in order:
            assert send_files(port, study(tmp_path / accession, accession)) == [0]
        clock.advance(daemon.settings.stable_after + 1)
        daemon.detect_once()
        assert daemon.worker.wait_idle(180), "a scoring job never finished or dead-lettered"
        found = states(daemon)
        assert found["GOOD-1"] == ("scored", None)
        assert found["GOOD-2"] == ("scored", None)
        crash_state, crash_reason = found[faults.CRASH]
        hang_state, hang_reason = found[faults.HANG]
        raise_state, raise_reason = found[faults.RAISE]
        assert crash_state == hang_state == raise_state == "failed"
        assert crash_reason is not None and "died (SIGKILL)" in crash_reason and "attempt 2 of 2" in crash_reason
        assert hang_reason is not None and "8 s time limit" in hang_reason
        assert raise_reason is not None and "RuntimeError: a scorer bug" in raise_reason
        received = pacs.wait_for(2)
        assert sorted(str(ds.AccessionNumber) for ds in received) == ["GOOD-1", "GOOD-2"]
        assert daemon.metrics.dead_letters._value.get() == 3  # type: ignore[attr-defined]
        # the studies waiting while GOOD-1 scored went together; the batch with the crash was split, so each
        # failed alone (above) and GOOD-2 was scored
        batches, studies = batch_figures(daemon)
        assert studies > batches, "no two studies ever shared a batch"

        # an admin re-queues a dead letter once the cause is fixed: it is scored like any other (here it fails
        # again, the fault being in the study, and is dead-lettered again rather than lost)
        result = CliRunner().invoke(
            cli, ["requeue", "--db", db_url, _uid(daemon, faults.RAISE)], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        assert "queued for scoring again" in result.output
        daemon.detect_once()  # the completion tick hands it over
        assert daemon.worker.wait_idle(60)
        assert states(daemon)[faults.RAISE][0] == "failed"


def batch_figures(daemon: RunningDaemon) -> tuple[float, float]:
    """(scoring batches started, study versions in them) from the daemon's Prometheus histogram."""
    samples = {s.name: s.value for metric in daemon.metrics.scoring_batches.collect() for s in metric.samples}
    return samples["fracwatch_scoring_batch_studies_count"], samples["fracwatch_scoring_batch_studies_sum"]


def _uid(daemon: RunningDaemon, accession: str) -> str:
    with daemon.sessions() as session:
        return str(session.scalar(select(Study.study_instance_uid).where(Study.accession_number == accession)))


def test_a_study_left_ready_by_a_killed_job_is_scored_once_after_restart(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock
) -> None:
    daemon = start_daemon(workers=0)  # receives only: nothing scores before the "crash"
    assert send_files(daemon.scp.address[1], study(tmp_path / "s", "ACC-READY")) == [0]
    clock.advance(daemon.settings.stable_after + 1)
    daemon.detect_once()
    settings = daemon.settings
    daemon.stop()
    engine = create_engine(settings.database_url)
    with engine.begin() as connection:  # as if the scoring process had claimed it and then been killed
        connection.execute(update(Study).values(state="ready"))
    engine.dispose()

    again = start_daemon(port=free_port(), http_port=free_port())
    assert again.worker.wait_idle(120)
    assert states(again)["ACC-READY"] == ("scored", None)
    with again.sessions() as session:
        assert len(session.scalars(select(StudyResult)).all()) == 1


def test_a_second_daemon_on_one_sqlite_file_is_refused(
    start_daemon: Callable[..., RunningDaemon], make_settings: Callable[..., Settings]
) -> None:
    first = start_daemon()
    second = make_settings(db_url=first.settings.database_url)
    with pytest.raises(DatabaseError) as refused:
        Daemon(second).start()
    message = str(refused.value)
    assert "\n" not in message and "already uses" in message and "PostgreSQL" in message
    assert first.readiness()[0]


def test_a_worker_host_needs_postgresql(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["worker", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "PostgreSQL" in lines[0], result.output


@pytest.fixture
def postgres_db(postgres_available: bool) -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards) for processes of their own."""
    if not postgres_available:
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    name = f"fw_jobs_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    tool = shutil.which("storescp", path="/usr/bin")
    assert tool, "DCMTK storescp not found: install the Debian package dcmtk"
    out = tmp_path / "pacs"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([tool, "-aet", "PACS", "-od", str(out), str(port)])
    time.sleep(0.5)
    try:
        yield f"PACS@127.0.0.1:{port}", out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _srs(directory: Path) -> Counter[str]:
    """Study Instance UID → SRs the PACS received for it."""
    found: Counter[str] = Counter()
    for path in directory.iterdir():
        ds = dcmread(path, stop_before_pixels=True)
        if ds.Modality == "SR":
            found[str(ds.StudyInstanceUID)] += 1
    return found


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_receivers_and_workers_on_one_postgresql_score_each_study_once_through_a_killed_worker(
    tmp_path: Path, postgres_db: str, storescp: tuple[str, Path]
) -> None:
    destination, pacs_dir = storescp
    data = tmp_path / "shared"  # the spool root both receivers and both workers mount
    common = ["--db", postgres_db, "--model", str(PHANTOM_MODEL)]
    env = {
        "FRACWATCH_COMPLETION_INTERVAL": "0.5",
        "FRACWATCH_DELIVERY_INTERVAL": "1",
        "FRACWATCH_TRIAGE_INTERVAL": "1",
        "FRACWATCH_JOB_STALLED_AFTER": "6",
    }
    with webhook_receiver([]) as (url, posts, _arrived):
        env["FRACWATCH_TRIAGE_WEBHOOKS"] = f'["{url}"]'
        ports = [free_port(), free_port()]
        receivers = [
            ServeProcess(
                serve_args(data, port, *common, "--workers", "0", "--stable-after", "2", "--destination", destination),
                env=env,
            )
            for port in ports
        ]
        doomed = ServeProcess(
            ["--data-dir", str(data), *common, "--workers", "1", "--destination", destination],
            env=env,
            command=[sys.executable, "-m", "tests.workerproc"],
        )
        survivor: ServeProcess | None = None
        try:
            for receiver in receivers:
                receiver.wait_for("listening as")
            # the slow study first: the doomed worker takes it, and dies with it half scored
            slow = study(tmp_path / "slow", faults.SLOW, images=2, fractured=True)
            assert send_files(ports[0], slow[:1]) == [0]
            assert send_files(ports[1], slow[1:]) == [0]
            doomed.wait_for(f"scoring started: study {dcmread(slow[0]).StudyInstanceUID}", timeout=120)
            doomed.kill_group()

            mount = tmp_path / "mount-b"  # the survivor's host mounts the shared root at another path
            mount.symlink_to(data, target_is_directory=True)
            survivor = ServeProcess(
                ["--data-dir", str(mount), *common, "--destination", destination],
                env=env,
                command=[sys.executable, "-m", "fracwatch", "worker"],
            )
            sent = [slow]
            for index in range(5):  # each study's two images split across the two receivers
                files = study(tmp_path / f"s{index}", f"ACC-{index}", images=2, fractured=index % 2 == 0)
                assert send_files(ports[0], files[:1]) == [0]
                assert send_files(ports[1], files[1:]) == [0]
                sent.append(files)
            uids = {str(dcmread(files[0]).StudyInstanceUID) for files in sent}

            deadline = time.monotonic() + 240
            while set(_srs(pacs_dir)) != uids and time.monotonic() < deadline:
                time.sleep(1)
            time.sleep(5)  # room for a duplicate to arrive, were one to be sent
            srs = _srs(pacs_dir)
            logs = "\n".join(f"--- {p.proc.args[-1]}\n{p.output[-2500:]}" for p in (*receivers, doomed, survivor))
            assert set(srs) == uids, f"SRs for {len(srs)} of {len(uids)} studies\n{logs}"
            assert set(srs.values()) == {1}, f"an SR sent twice: {srs}"

            engine = create_engine(postgres_db)
            with engine.connect() as connection:
                scored = connection.execute(select(Study.state, Study.version)).all()
                result_rows = connection.execute(select(StudyResult.study_id, StudyResult.study_version)).all()
                paths = "SELECT path FROM instances UNION ALL SELECT path FROM produced_objects"
                stored = connection.scalars(text(paths)).all()
                assert all(not Path(path).is_absolute() for path in stored)  # relative to the shared root
            assert {state for state, _ in scored} == {"scored"} and {v for _, v in scored} == {1}
            assert len(result_rows) == len(set(result_rows)) == len(uids)  # every version scored exactly once

            with engine.connect() as connection:
                flagged = set(connection.scalars(select(Study.study_instance_uid).where(Study.flagged_at.is_not(None))))
            engine.dispose()
            bodies = [json.dumps(post["json"]) for post in posts]
            sent = Counter(uid for uid in uids for body in bodies if uid in body)
            assert flagged and set(sent) == flagged and set(sent.values()) == {1}, f"flags sent: {sent}"
            # the receivers never score: their memory stays that of a listener (the documented bound)
            for receiver in receivers:
                assert receiver.peak_rss_mb() < 1500
        finally:
            for process in [*receivers, doomed, *([survivor] if survivor else [])]:
                process.stop()


@pytest.mark.postgres
@pytest.mark.timeout(240)
def test_receivers_sharing_one_port_each_take_associations_and_record_every_instance_once(
    tmp_path: Path, postgres_db: str
) -> None:
    port = free_port()
    common = ["--db", postgres_db, "--model", str(PHANTOM_MODEL), "--workers", "0", "--no-http", "--reuse-port"]
    receivers = [ServeProcess(serve_args(tmp_path / "shared", port, *common)) for _ in range(2)]
    try:
        for receiver in receivers:
            receiver.wait_for("port shared with other receivers")
        files = study(tmp_path / "s", "ACC-SHARED", images=16)  # one study, its images spread over both
        with ThreadPoolExecutor(4) as senders:
            statuses = list(senders.map(lambda path: send_files(port, [path]), files))
        assert statuses == [[0]] * len(files)
        engine = create_engine(postgres_db)
        try:
            with engine.connect() as connection:
                instances = connection.scalar(text("SELECT count(*) FROM instances"))
                studies = connection.scalar(text("SELECT count(*) FROM studies"))
        finally:
            engine.dispose()
        assert (instances, studies) == (len(files), 1)
        taken = [receiver.output.count(" stored ") for receiver in receivers]
        assert sum(taken) == len(files) and all(taken), f"associations per receiver: {taken}"
    finally:
        for receiver in receivers:
            receiver.stop()


def test_receivers_sharing_a_port_need_postgresql(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path / "data"), "--reuse-port"])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "PostgreSQL" in errors[0] and "reuse_port" in errors[0], result.output
    assert not (tmp_path / "data" / "fracwatch.db").exists()  # refused before anything was made


def _set_job_status(daemon: RunningDaemon, lock: str, status: str) -> None:
    """As Procrastinate's worker would: the job with this queueing lock starts (doing) or ends."""
    queue = daemon.queue
    if isinstance(queue, MemoryQueue):
        for row in queue.connector.jobs.values():
            if row["queueing_lock"] == lock:
                row["status"] = status
        return
    with daemon.sessions() as session, session.begin():
        session.execute(
            text("UPDATE procrastinate_jobs SET status = :status WHERE queueing_lock = :lock"),
            {"status": status, "lock": lock},
        )


def test_a_scoring_job_is_not_deferred_again_while_one_waits_or_runs(
    start_daemon: Callable[..., RunningDaemon], db_url: str
) -> None:
    daemon = start_daemon(db_url=db_url, workers=0)  # nothing takes the scoring jobs: the test moves them
    job = score_job(HandOver(str(generate_uid()), 1))
    assert job.queueing_lock is not None
    assert daemon.queue.defer(job)
    assert not daemon.queue.defer(job)  # one waits: Procrastinate's queueing lock
    _set_job_status(daemon, job.queueing_lock, "doing")
    assert not daemon.queue.defer(job)  # one runs: its retry must not meet a copy (a unique violation)
    assert daemon.queue.pending(SCORING_QUEUE) == 1
    _set_job_status(daemon, job.queueing_lock, "failed")
    assert daemon.queue.defer(job)  # none waits or runs: deferred again
