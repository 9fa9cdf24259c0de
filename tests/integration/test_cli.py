"""The CLI in-process (click's runner) and as a real process, against real databases and associations."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom import dcmread
from sqlalchemy import select, text

from fracwatch.cli import cli
from fracwatch.daemon import RunningDaemon
from fracwatch.store import db
from fracwatch.store.models import AuditEvent
from tests import dicomgen
from tests.conftest import FakeClock, free_port, send_files


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fracwatch", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_db_upgrade_creates_schema(tmp_path: Path, db_url: str) -> None:
    result = CliRunner().invoke(cli, ["db", "upgrade", "--db", db_url])
    assert result.exit_code == 0, result.output
    assert f"database at revision {db.head_revision()}" in result.output
    again = CliRunner().invoke(cli, ["db", "upgrade", "--db", db_url])
    assert again.exit_code == 0


def test_studies_json_contract(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock, db_url: str
) -> None:
    daemon = start_daemon(db_url=db_url)
    ids = dicomgen.StudyIds(accession="ACC-77")
    files = [dicomgen.save(dicomgen.image(ids, seed=i), tmp_path / f"{i}.dcm") for i in range(3)]
    other = dicomgen.StudyIds(accession="ACC-88")
    files.append(dicomgen.save(dicomgen.image(other), tmp_path / "other.dcm"))
    assert send_files(daemon.scp.address[1], files) == [0, 0, 0, 0]

    result = CliRunner().invoke(cli, ["studies", "--db", db_url, "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["study_instance_uid"]: row for row in json.loads(result.output)}
    assert rows[ids.study_uid]["instances"] == 3
    assert isinstance(rows[ids.study_uid]["instances"], int)
    assert rows[ids.study_uid]["state"] == "receiving"
    assert rows[other.study_uid]["instances"] == 1
    # the --json contract: the fields it always had, from the one study query the API uses too
    assert {"series", "completed_at", "first_received_at", "last_received_at", "version"} <= set(rows[ids.study_uid])
    series = {dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files[:3]}
    assert rows[ids.study_uid]["series"] == len(series) and rows[ids.study_uid]["completed_at"] is None

    by_accession = CliRunner().invoke(cli, ["studies", "--db", db_url, "--json", "--accession", "ACC-88"])
    assert [r["study_instance_uid"] for r in json.loads(by_accession.output)] == [other.study_uid]

    clock.advance(60)
    daemon.detect_once()
    assert daemon.worker.wait_idle(10)
    ready = CliRunner().invoke(cli, ["studies", "--db", db_url, "--json", "--state", "scored"])
    assert len(json.loads(ready.output)) == 2
    assert (
        json.loads(CliRunner().invoke(cli, ["studies", "--db", db_url, "--json", "--state", "receiving"]).output) == []
    )
    future = CliRunner().invoke(cli, ["studies", "--db", db_url, "--json", "--since", "2999-01-01"])
    assert json.loads(future.output) == []
    # a bare --until date is its midnight and excluded, as in the API: until today shows nothing received today
    today_date = datetime.now(UTC).date().isoformat()
    tomorrow = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    until_today = CliRunner().invoke(cli, ["studies", "--db", db_url, "--json", "--until", today_date])
    assert json.loads(until_today.output) == []
    until_tomorrow = CliRunner().invoke(cli, ["studies", "--db", db_url, "--json", "--until", tomorrow])
    assert len(json.loads(until_tomorrow.output)) == 2
    today = CliRunner().invoke(cli, ["studies", "--db", db_url, "--today"])
    assert ids.study_uid in today.output and "scored" in today.output
    assert "Doe" not in today.output
    with daemon.sessions() as session:
        audit = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
    assert len(audit) == 8 and {a.action for a in audit} == {"cli.studies"}  # every CLI read is audited
    assert all(a.actor.startswith("cli:") and a.client == "local" for a in audit)
    assert "ACC-88" in audit[1].target


def test_studies_on_unmigrated_database_says_what_to_do(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["studies", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "fracwatch db upgrade" in result.output


def test_studies_bad_date(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["studies", "--data-dir", str(tmp_path), "--since", "yesterday"])
    assert result.exit_code == 2 and "--since" in result.output


def test_echo(start_daemon: Callable[..., RunningDaemon]) -> None:
    daemon = start_daemon()
    port = daemon.scp.address[1]
    ok = CliRunner().invoke(cli, ["echo", "127.0.0.1", str(port), "--ae", "FRACWATCH"])
    assert ok.exit_code == 0 and "success" in ok.output
    down = CliRunner().invoke(cli, ["echo", "127.0.0.1", str(free_port()), "--timeout", "2"])
    assert down.exit_code == 1 and "no association" in down.output


def test_echo_rejected_by_allow_list(start_daemon: Callable[..., RunningDaemon]) -> None:
    daemon = start_daemon(allowed_calling_aets=["PACS"])
    port = daemon.scp.address[1]
    result = CliRunner().invoke(cli, ["echo", "127.0.0.1", str(port), "--calling-ae", "NOBODY"])
    assert result.exit_code == 1 and "rejected" in result.output


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--port", "70000"], "port"),
        (["--ae-title", "THIS_AE_TITLE_IS_TOO_LONG"], "ae_title"),
        (["--destination", "PACS-at-nowhere"], "destinations"),
        (["--stable-after", "0"], "stable_after"),
    ],
)
def test_serve_invalid_setting_one_line_no_traceback(tmp_path: Path, args: list[str], key: str) -> None:
    result = run("serve", "--data-dir", str(tmp_path), *args)
    assert result.returncode == 2
    assert f"invalid setting '{key}" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_invalid_environment_value(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fracwatch", "serve", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FRACWATCH_MAX_ASSOCIATIONS": "many"},
        check=False,
    )
    assert result.returncode == 2 and "max_associations" in result.stderr and "Traceback" not in result.stderr


def test_serve_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", "--data-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_serve_http_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        http_port = busy.getsockname()[1]
        result = run(
            "serve",
            "--data-dir",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--http-port",
            str(http_port),
        )
    assert result.returncode == 1
    assert f"cannot serve HTTP on 127.0.0.1:{http_port}" in result.stderr and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "ERROR" in line or "error" in line] == [
        f"fracwatch: error: cannot serve HTTP on 127.0.0.1:{http_port} (port in use or not permitted)"
    ]  # uvicorn's own ERROR line no longer comes first


def test_runtime_errors_are_one_line(tmp_path: Path) -> None:
    unreachable = run("studies", "--db", f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
    assert unreachable.returncode == 1
    assert len(unreachable.stderr.strip().splitlines()) == 1, unreachable.stderr
    assert "Connection refused" in unreachable.stderr and "sqlalche.me" not in unreachable.stderr
    closed = run("echo", "127.0.0.1", str(free_port()), "--timeout", "2")
    assert closed.returncode == 1
    assert closed.stderr.strip().splitlines() == [closed.stderr.strip()] and "no association" in closed.stderr


def test_serve_bad_database_url(tmp_path: Path) -> None:
    result = run("serve", "--data-dir", str(tmp_path), "--db", "nosuchdb://x")
    assert result.returncode == 1 and "database" in result.stderr and "Traceback" not in result.stderr


def test_listing_on_an_older_schema_says_to_upgrade(tmp_path: Path) -> None:
    from alembic import command

    engine = db.make_engine(f"sqlite:///{tmp_path / 'fracwatch.db'}")
    command.upgrade(db.alembic_config(engine), "0001")
    engine.dispose()
    result = CliRunner().invoke(cli, ["outbox", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "schema revision 0001" in result.output and "fracwatch db upgrade" in result.output


def _serve_refused(*args: str) -> str:
    result = run("serve", "--port", str(free_port()), "--http-port", str(free_port()), *args)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return errors[0]


def test_serve_does_not_create_a_database_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "dir" / "x.db"
    error = _serve_refused("--data-dir", str(tmp_path / "data"), "--db", f"sqlite:///{missing}")
    assert f"the database {missing} does not exist" in error and "fracwatch db upgrade" in error
    assert not missing.parent.parent.exists()  # nothing created, no folder either


def test_a_data_directory_is_refused_with_another_database(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon()  # the data directory's own SQLite database, created on first start
    data = daemon.settings.data_dir
    own = daemon.settings.database_url
    files = [dicomgen.save(dicomgen.image(dicomgen.StudyIds(), seed=1), tmp_path / "a.dcm")]
    assert send_files(daemon.scp.address[1], files) == [0]
    daemon.stop()
    assert json.loads((data / "database.json").read_text())["url"] == own

    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert CliRunner().invoke(cli, ["db", "upgrade", "--db", other]).exit_code == 0  # created when asked
    error = _serve_refused("--data-dir", str(data), "--db", other)
    assert f"belongs to the database {own}" in error and f"not to {other}" in error
    engine = db.make_engine(other)
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM instances")) == 0  # nothing re-registered
    engine.dispose()
