"""Schemathesis against the project's own OpenAPI: every operation, with an admin token and with none, on a
running daemon (SQLite and PostgreSQL) holding real studies — never a 5xx, and the server stays up.

The 28 of 465 hand-made probes that were 500s (issue 35) are in test_http_api; this explores what the schema
allows beyond them (a bounded number of examples per operation, so it stays a few seconds each).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from fracwatch.daemon import RunningDaemon
from fracwatch.service.queries import create_token
from tests.seed import seed_study

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
EXAMPLES = 25  # per operation and authentication: bounded for CI

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def running(start_daemon: Callable[..., RunningDaemon], db_url: str) -> RunningDaemon:
    daemon = start_daemon(db_url=db_url)
    for n in range(4):
        seed_study(
            daemon.sessions,
            f"1.7.{n + 1}",
            received_at=T0 + timedelta(hours=n),
            category=("positive", "negative", "doubt", None)[n],
            probability=(0.9, 0.1, 0.5, 0.0)[n],
            accession=f"F{n}",
        )
    return daemon


@pytest.fixture
def api(running: RunningDaemon) -> Any:
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{running.settings.http_port}/openapi.json")


@pytest.fixture
def admin(running: RunningDaemon) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_token(running.settings, 'fuzz-admin', 'admin')}"}


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases on every run: a failure reproduces
)
def test_no_operation_answers_a_server_error(case: Any, running: RunningDaemon, admin: dict[str, str]) -> None:
    base = f"http://127.0.0.1:{running.settings.http_port}"
    for headers in (admin, {}):  # each case with an admin token, then with none
        response = case.call(base_url=base, headers=headers, timeout=60)
        assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code}"
        if not headers and case.path.startswith("/api/"):
            # nothing without a token: 401, or refused before that (400 body, 403 cross-site, 405, 422 bad value)
            assert 400 <= response.status_code < 500, (response.status_code, case.method, response.text)
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
