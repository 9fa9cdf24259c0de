"""Shared fixtures: free ports, real databases (SQLite always, PostgreSQL when reachable), a running daemon."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from fracwatch.config import Settings, load_settings
from fracwatch.daemon import Daemon, RunningDaemon

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
# The bootstrap bundle trained on 2-D limb phantoms: tests that need a predictable verdict send phantom images
# (fractured → positive) and run the daemon with this model rather than the shipped default.
PHANTOM_MODEL = Path(__file__).resolve().parents[1] / "models" / "fracwatch-phantom"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postgres_reachable() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    return _postgres_reachable()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, postgres_available: bool) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'fracwatch.db'}"  # the data directory's own (make_settings)
        return
    if not postgres_available:
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    name = f"fw_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        for daemon in STARTED:  # before the database goes: their job runners would wait on it
            daemon.stop()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


STARTED: list[RunningDaemon] = []
"""Daemons the fixtures started, stopped at the latest when their database is dropped."""


class FakeClock:
    """Real UTC time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ``fracwatch synth --phantom`` set (train/val/test splits, boxes), rendered once for the session;
    tests read it and never change it."""
    from click.testing import CliRunner

    from fracwatch.cli import cli

    out = tmp_path_factory.mktemp("phantoms") / "set"
    result = CliRunner().invoke(cli, ["synth", "--phantom", "--out", str(out), "--poses", "16", "--per-pose", "6",
                                      "--size", "128", "160"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "host": "127.0.0.1",
            "port": free_port(),
            "http_port": free_port(),
            "model": PHANTOM_MODEL,
            "completion_interval": 3600,  # tests drive completion with detect_once() and a fake clock
            "shutdown_grace": 5,
        }
        values.update(overrides)
        return load_settings(None, **values)

    return build


@pytest.fixture
def start_daemon(make_settings: Callable[..., Settings], clock: FakeClock) -> Iterator[Callable[..., RunningDaemon]]:
    started: list[RunningDaemon] = []

    def start(**overrides: Any) -> RunningDaemon:
        daemon = Daemon(make_settings(**overrides), clock=clock).start()
        started.append(daemon)
        STARTED.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
        STARTED.remove(daemon)


def send_files(port: int, paths: list[Path], calling_ae: str = "MODALITY", called_ae: str = "FRACWATCH") -> list[int]:
    """C-STORE each file (its raw bytes, as stored) over one association; return the statuses."""
    ae = AE(ae_title=calling_ae)
    contexts = {
        (str(dcmread(p, stop_before_pixels=True).SOPClassUID), str(dcmread(p).file_meta.TransferSyntaxUID))
        for p in paths
    }
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, "association was not established"
    statuses = []
    try:
        for path in paths:
            response = assoc.send_c_store(path)
            statuses.append(int(response.Status) if "Status" in response else -1)
    finally:
        assoc.release()
    return statuses


def echo_status(port: int, calling_ae: str = "MODALITY") -> int | None:
    """C-ECHO; the status, or None if the association was rejected."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACWATCH")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()
