"""The admin API over HTTP: auth (401/403), audit rows, filters and paging, CSV, feedback, health and metrics.

The application runs in uvicorn on a free loopback port against real SQLite and PostgreSQL databases.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from fracwatch.config import load_settings
from fracwatch.service.metrics import Metrics
from fracwatch.store import access, db
from fracwatch.store.models import AuditEvent
from fracwatch.web.app import HttpServer, create_app
from fracwatch.web.context import WebContext
from tests.conftest import free_port
from tests.seed import seed_study

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Any]]:
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    yield db.session_factory(engine)
    engine.dispose()


@pytest.fixture
def server(sessions: sessionmaker[Any], tmp_path: Path) -> Iterator[str]:
    settings = load_settings(None, data_dir=tmp_path)
    ctx = WebContext(sessions, settings, Metrics(), ready=lambda: (True, {"database": True}))
    port = free_port()
    http = HttpServer(create_app(ctx), "127.0.0.1", port)
    http.start()
    yield f"http://127.0.0.1:{port}"
    http.stop()


def make_token(sessions: sessionmaker[Any], name: str, role: str) -> dict[str, str]:
    with sessions() as session, session.begin():
        return {"Authorization": f"Bearer {access.create_token(session, name, role, T0)}"}


@pytest.fixture
def tokens(sessions: sessionmaker[Any]) -> dict[str, dict[str, str]]:
    return {role: make_token(sessions, f"{role}-1", role) for role in ("viewer", "admin")}


def seed(sessions: sessionmaker[Any], count: int = 12) -> None:
    for n in range(count):
        seed_study(
            sessions,
            f"1.5.{n + 1}",
            received_at=T0 + timedelta(hours=n * 6),
            category=("positive", "negative", "negative", "doubt")[n % 4],
            probability=(0.9, 0.1, 0.2, 0.5)[n % 4] - n / 1000,
            accession=f"ACC{n:03d}",
            body_part=("WRIST", "CHEST")[n % 2],
            sending_ae=("CR1", "CR2", "CR3")[n % 3],
            model_version="1.0.0" if n < 6 else "1.1.0",
        )


def test_auth_paths(server: str, sessions: sessionmaker[Any], tokens: dict[str, dict[str, str]]) -> None:
    with httpx.Client(base_url=server) as client:
        for path in ("/api/studies", "/api/stats", "/api/worklist", "/api/export.csv", "/api/audit"):
            answer = client.get(path)
            assert answer.status_code == 401, path
            assert answer.headers["www-authenticate"] == "Bearer"
        assert client.get("/api/studies", headers={"Authorization": "Bearer fw_not-a-token"}).status_code == 401
        assert client.get("/api/audit", headers=tokens["viewer"]).status_code == 403
        assert client.get("/api/outbox", headers=tokens["viewer"]).status_code == 403
        assert client.get("/api/audit", headers=tokens["admin"]).status_code == 200
        assert client.get("/api/studies", headers=tokens["admin"]).status_code == 200  # admin ⊇ viewer
        for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert client.get(open_path).status_code == 200, open_path
        assert "/api/studies/{study_uid}" in client.get("/openapi.json").json()["paths"]
        assert "fracwatch_http_requests_total" in client.get("/metrics").text
        with sessions() as session, session.begin():
            access.revoke_token(session, "viewer-1", T0)
        assert client.get("/api/studies", headers=tokens["viewer"]).status_code == 401


def test_filters_paging_detail_and_audit(
    server: str, sessions: sessionmaker[Any], tokens: dict[str, dict[str, str]]
) -> None:
    seed(sessions)
    viewer = tokens["viewer"]
    with httpx.Client(base_url=server, headers=viewer) as client:
        page = client.get("/api/studies", params={"limit": 5, "offset": 10}).json()
        assert page["total"] == 12 and [r["study_instance_uid"] for r in page["items"]] == ["1.5.2", "1.5.1"]
        positives = client.get("/api/studies", params={"category": "positive"}).json()
        assert positives["total"] == 3 and {r["category"] for r in positives["items"]} == {"positive"}
        assert client.get("/api/studies", params={"body_part": "chest"}).json()["total"] == 6
        assert client.get("/api/studies", params={"sending_ae": "CR3"}).json()["total"] == 4
        assert client.get("/api/studies", params={"model_version": "1.1.0"}).json()["total"] == 6
        (hit,) = client.get("/api/studies", params={"accession": "ACC004"}).json()["items"]
        assert hit["study_instance_uid"] == "1.5.5" and hit["triage_priority"] == "positive"
        window = client.get("/api/studies", params={"since": "2026-11-21", "until": "2026-11-22"}).json()
        assert [r["study_instance_uid"] for r in window["items"]] == ["1.5.7", "1.5.6", "1.5.5", "1.5.4"]
        top = client.get("/api/studies", params={"sort": "-probability", "limit": 2}).json()["items"]
        assert [r["study_instance_uid"] for r in top] == ["1.5.1", "1.5.5"]
        assert client.get("/api/studies", params={"since": "yesterday"}).status_code == 422
        assert client.get("/api/studies", params={"category": "broken"}).status_code == 422
        assert client.get("/api/studies", params={"limit": 0}).status_code == 422

        detail = client.get("/api/studies/1.5.1").json()
        assert detail["study"]["accession_number"] == "ACC000"
        (result,) = detail["results"]
        assert result["category"] == "positive" and result["sr_sop_instance_uid"] == "1.5.1.9"
        assert result["images"][0]["sop_instance_uid"] == "1.5.1.1"
        assert client.get("/api/studies/9.9.9").status_code == 404

        worklist = client.get("/api/worklist").json()["items"]
        assert [r["study_instance_uid"] for r in worklist] == ["1.5.1", "1.5.5", "1.5.9"]

        exported = client.get("/api/export.csv", params={"body_part": "WRIST"})
        assert exported.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert len(rows) == 6 and {r["body_part"] for r in rows} == {"WRIST"}
        assert "patient" not in exported.text.lower()

    with sessions() as session:
        audit = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
    actions = [(a.actor, a.action) for a in audit]
    assert ("viewer-1", "study.view") in actions and ("viewer-1", "export.csv") in actions
    assert ("viewer-1", "worklist") in actions
    assert any(a.target == "1.5.1" and a.client == "127.0.0.1" for a in audit)
    with httpx.Client(base_url=server, headers=tokens["admin"]) as client:
        trail = client.get("/api/audit", params={"actor": "viewer-1", "action": "study.view"}).json()
        assert trail["total"] == 2 and {i["target"] for i in trail["items"]} == {"1.5.1", "9.9.9"}


def test_feedback_and_stats(server: str, sessions: sessionmaker[Any], tokens: dict[str, dict[str, str]]) -> None:
    seed(sessions, 4)
    with httpx.Client(base_url=server, headers=tokens["viewer"]) as client:
        made = client.post("/api/studies/1.5.1/feedback", json={"verdict": "agree"})
        assert made.status_code == 201
        assert client.post("/api/studies/1.5.2/feedback", json={"verdict": "disagree", "note": "buckle"}).is_success
        assert client.post("/api/studies/1.5.1/feedback", json={"verdict": "maybe"}).status_code == 422
        assert client.post("/api/studies/9.9.9/feedback", json={"verdict": "agree"}).status_code == 404
        stats = client.get("/api/stats").json()
        assert stats["studies_scored"] == 4 and stats["counts"]["negative"] == 2
        assert stats["positive_rate"] == pytest.approx(0.25)
        assert stats["turnaround_p50"] == pytest.approx(30.0)
        assert [(d["day"], d["counts"]) for d in stats["days"]] == [
            ("2026-11-20", {"positive": 1, "negative": 2}),
            ("2026-11-21", {"doubt": 1}),
        ]
        agreement = {(a["category"], a["model_version"]): a["agreement_rate"] for a in stats["agreement"]}
        assert agreement == {("positive", "1.0.0"): 1.0, ("negative", "1.0.0"): 0.0}
        feedback = client.get("/api/studies/1.5.2").json()["feedback"]
        assert feedback[0]["user"] == "viewer-1" and feedback[0]["note"] == "buckle"


HOSTILE = [
    ("/api/studies", {"since": "9999-12-31T23:59:59-12:00"}, "since"),
    ("/api/studies", {"until": "0001-01-01T00:00:00+14:00"}, "until"),
    ("/api/stats", {"since": "9999-12-31T23:59:59-12:00"}, "since"),
    ("/api/audit", {"since": "0001-01-01T00:00:00+14:00"}, "since"),
    ("/api/studies", {"offset": "9223372036854775808"}, "offset"),
    ("/api/studies", {"offset": "1e19"}, "offset"),
    ("/api/audit", {"offset": "9223372036854775807"}, "offset"),
    ("/api/studies", {"accession": "a\x00b"}, "accession"),
    ("/api/studies", {"body_part": "\x00"}, "body_part"),
    ("/api/audit", {"actor": "x\x00"}, "actor"),
    ("/api/export.csv", {"sending_ae": "A\x00"}, "sending_ae"),
    ("/api/studies/1.2%003", {}, "path"),
]


def test_hostile_query_values_are_422_naming_the_parameter(
    server: str, sessions: sessionmaker[Any], tokens: dict[str, dict[str, str]]
) -> None:
    """28 of 465 probes were once 500s: date offsets past the datetime range, offsets past int64, NUL bytes."""
    seed_study(sessions, "1.5.1", received_at=T0, category="positive", probability=0.9)
    with httpx.Client(base_url=server, headers=tokens["admin"]) as client:
        for path, params, name in HOSTILE:
            answer = client.get(path, params=params)
            assert answer.status_code == 422, (path, params, answer.status_code, answer.text)
            assert name in answer.text, (path, params, answer.text)
        nul_note = client.post("/api/studies/1.5.1/feedback", json={"verdict": "note", "note": "a\x00b"})
        assert nul_note.status_code == 422 and "note" in nul_note.text
        assert client.get("/api/studies", params={"offset": "1000"}).status_code == 200  # a large, legal page
        assert client.get("/healthz").status_code == 200  # and the server is still up


def test_browser_protections_csrf_headers_and_refused_sign_ins(
    server: str, sessions: sessionmaker[Any], tokens: dict[str, dict[str, str]]
) -> None:
    seed_study(sessions, "1.5.1", received_at=T0, category="positive", probability=0.9)
    viewer_token = tokens["viewer"]["Authorization"].removeprefix("Bearer ")
    own = {"Origin": server}
    evil = {"Origin": "https://attacker.example"}
    with httpx.Client(base_url=server) as client:
        # login CSRF: a cross-site sign-in under someone's token is refused; a failed sign-in is audited
        assert client.post("/login", data={"token": viewer_token}, headers=evil).status_code == 403
        assert client.post("/login", data={"token": "fw_wrong"}, headers=own).status_code == 200
        signed_in = client.post("/login", data={"token": viewer_token}, headers=own)
        assert signed_in.status_code == 303
        cookie = client.cookies.get("fracwatch_session")
        assert cookie and viewer_token not in cookie  # a session key, not the API token itself
        # the cookie rides along, but a cross-site form post or JSON post is refused
        form = {"verdict": "agree", "note": "x"}
        assert client.post("/studies/1.5.1/feedback", data=form, headers=evil).status_code == 403
        assert client.post("/studies/1.5.1/feedback", data=form).status_code == 403  # no Origin, no Referer
        refused = client.post("/api/studies/1.5.1/feedback", json={"verdict": "agree"}, headers=evil)
        assert refused.status_code == 403
        assert client.post("/studies/1.5.1/feedback", data=form, headers=own).status_code == 303
        referer = {"Referer": f"{server}/studies/1.5.1"}
        assert client.post("/studies/1.5.1/feedback", data=form, headers=referer).status_code == 303
        page = client.get("/studies/1.5.1")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert client.post("/logout", headers=own).status_code == 303
    with httpx.Client(base_url=server, cookies={"fracwatch_session": cookie}) as replay:
        assert replay.get("/studies/1.5.1").status_code == 303  # signed out: the old cookie opens nothing
        assert replay.get("/api/studies").status_code == 401
    with httpx.Client(base_url=server, headers=tokens["viewer"]) as api:
        # an API client with a bearer token is not a browser riding a cookie: no Origin needed
        assert api.post("/api/studies/1.5.1/feedback", json={"verdict": "note", "note": "ok"}).status_code == 201
        listing = api.get("/api/studies")
        assert listing.headers["cache-control"] == "no-store" and listing.headers["x-content-type-options"] == "nosniff"
        docs = api.get("/docs")
        assert docs.status_code == 200 and "/static/swagger/swagger-ui-bundle.js" in docs.text
        assert "https://" not in docs.text and "http://" not in docs.text  # nothing fetched from elsewhere
        assert api.get("/static/swagger/swagger-ui-bundle.js").status_code == 200
        assert api.get("/redoc").status_code == 404
        schemes = api.get("/openapi.json").json()["components"]["securitySchemes"]
        assert any(s.get("scheme") == "bearer" for s in schemes.values())
        assert api.get("/api/studies", headers={"Authorization": "Bearer fw_guess"}).status_code == 401
    with sessions() as session:
        actions = [e.action for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert "dashboard.sign_in_refused" in actions and "api.token_refused" in actions
    assert actions.count("study.feedback") == 3
