"""Retention with a fake clock (daemon job and `fracwatch purge`), and the `fracwatch token` commands."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from fracwatch.cli import cli
from fracwatch.daemon import RunningDaemon
from fracwatch.store.models import Instance, ProducedObject
from tests.conftest import FakeClock, send_files
from tests.integration.test_scoring import complete, two_image_study

pytestmark = pytest.mark.timeout(180)


def test_retention_deletes_old_files_and_keeps_rows(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock
) -> None:
    daemon = start_daemon(retention_days=7)
    data_dir = str(daemon.settings.data_dir)
    _, files = two_image_study(tmp_path / "old")
    send_files(daemon.scp.address[1], files)
    complete(daemon, clock)
    assert daemon.purge_once() == 0  # nothing is a week old yet

    clock.advance(6 * 86400)
    _, young = two_image_study(tmp_path / "young")
    send_files(daemon.scp.address[1], young)
    clock.advance(2 * 86400)  # the first study is now 8 days old, the second 2 days and not scored yet
    with daemon.sessions() as session:
        old_paths = [Path(p) for p in session.scalars(select(Instance.path).order_by(Instance.id)).all()[:2]]
        sr_path = Path(session.scalars(select(ProducedObject.path)).one())
    assert all(p.exists() for p in [*old_paths, sr_path])

    # the CLI's dry run uses the real clock: ask it for files older than 0.000001 days (86 ms)
    preview = CliRunner().invoke(cli, ["purge", "--data-dir", data_dir, "--days", "0.000001", "--dry-run", "--json"])
    assert preview.exit_code == 0, preview.output
    listed = json.loads(preview.output)
    # the old study's images (received on the real clock); not the young, unscored study; not the SR, which
    # was created on the test's fake clock, ahead of real time
    assert sorted(item["kind"] for item in listed) == ["instance", "instance"]
    assert {Path(item["path"]) for item in listed} == set(old_paths)
    assert all(Path(item["path"]).exists() for item in listed)  # a dry run deletes nothing

    assert daemon.purge_once() == 3  # two images and the SR of the old study
    assert not any(p.exists() for p in [*old_paths, sr_path])
    with daemon.sessions() as session:
        instances = session.scalars(select(Instance).order_by(Instance.id)).all()
        assert [i.purged_at is not None for i in instances] == [True, True, False, False]
        assert [i.state for i in instances][:2] == ["purged", "purged"]
        assert session.scalars(select(ProducedObject.purged_at)).one() is not None
    assert all(Path(i.path).exists() for i in instances[2:])
    assert daemon.purge_once() == 0  # idempotent
    metrics = httpx.get(f"http://127.0.0.1:{daemon.settings.http_port}/metrics").text
    assert "fracwatch_retention_purged_files_total 3.0" in metrics


def test_purge_needs_a_period(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["purge", "--data-dir", str(tmp_path), "--dry-run"])
    assert result.exit_code == 2 and "no retention period" in result.output


def test_token_commands(tmp_path: Path, db_url: str) -> None:
    assert CliRunner().invoke(cli, ["db", "upgrade", "--db", db_url]).exit_code == 0
    made = CliRunner().invoke(cli, ["token", "create", "--db", db_url, "--role", "admin", "--name", "ops"])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    assert token.startswith("fw_") and len(token) > 40
    duplicate = CliRunner().invoke(cli, ["token", "create", "--db", db_url, "--role", "viewer", "--name", "ops"])
    assert duplicate.exit_code == 1 and "exists" in duplicate.output
    bad_role = CliRunner().invoke(cli, ["token", "create", "--db", db_url, "--role", "root"])
    assert bad_role.exit_code == 2
    listed = json.loads(CliRunner().invoke(cli, ["token", "list", "--db", db_url, "--json"]).output)
    assert [(t["name"], t["role"], t["revoked_at"]) for t in listed] == [("ops", "admin", None)]
    assert token not in json.dumps(listed)
    assert CliRunner().invoke(cli, ["token", "revoke", "--db", db_url, "ops"]).exit_code == 0
    again = CliRunner().invoke(cli, ["token", "revoke", "--db", db_url, "ops"])
    assert again.exit_code == 1 and "no active token" in again.output
    listed = json.loads(CliRunner().invoke(cli, ["token", "list", "--db", db_url, "--json"]).output)
    assert listed[0]["revoked_at"] is not None
