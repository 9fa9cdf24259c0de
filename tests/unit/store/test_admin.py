"""Admin queries, tokens, audit, triage flags and retention against real SQLite and PostgreSQL databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from fracwatch.store import access, results, retention, search
from fracwatch.store import triage as triage_store
from fracwatch.store.models import ApiToken, DashboardSession, Delivery, Study, TriageMessage
from fracwatch.store.search import StudyQuery
from tests.seed import seed_study

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


@pytest.fixture
def corpus(sessions: sessionmaker[Any]) -> sessionmaker[Any]:
    """Nine studies over three days, varied in category, body part, sender and model version."""
    plan = [
        ("1.9.1", 0, "positive", 0.91, "WRIST", "CR1", "1.0.0"),
        ("1.9.2", 0, "negative", 0.05, "WRIST", "CR1", "1.0.0"),
        ("1.9.3", 0, "doubt", 0.40, "HAND", "CR2", "1.0.0"),
        ("1.9.4", 1, "negative", 0.10, "CHEST", "CR2", "1.1.0"),
        ("1.9.5", 1, "positive", 0.80, "WRIST", "CR2", "1.1.0"),
        ("1.9.6", 1, "negative", 0.20, "ANKLE", "CR1", "1.1.0"),
        ("1.9.7", 2, "error", 0.0, "WRIST", "CR1", "1.1.0"),
        ("1.9.8", 2, "negative", 0.15, "WRIST", "CR3", "1.1.0"),
        ("1.9.9", 2, None, 0.0, "HIP", "CR3", "1.1.0"),
    ]
    for n, (uid, day, category, p, part, ae, version) in enumerate(plan):
        seed_study(
            sessions,
            uid,
            received_at=T0 + timedelta(days=day, minutes=n),
            category=category,
            probability=p,
            accession=f"A{n}",
            body_part=part,
            sending_ae=ae,
            model_version=version,
        )
    return sessions


def uids(rows: list[search.StudyRow]) -> list[str]:
    return [r.study_instance_uid for r in rows]


def test_search_filters_paging_and_sorting(corpus: sessionmaker[Any]) -> None:
    with corpus() as session:
        total, rows = search.search_studies(session, StudyQuery())
        assert total == 9 and uids(rows)[0] == "1.9.9"  # newest first
        assert uids(search.search_studies(session, StudyQuery(category="positive"))[1]) == ["1.9.5", "1.9.1"]
        assert search.search_studies(session, StudyQuery(body_part="wrist"))[0] == 5
        assert uids(search.search_studies(session, StudyQuery(accession_number="A3"))[1]) == ["1.9.4"]
        assert search.search_studies(session, StudyQuery(sending_ae="CR2"))[0] == 3
        assert search.search_studies(session, StudyQuery(model_version="1.0.0"))[0] == 3
        day1 = StudyQuery(received_since=T0 + timedelta(days=1), received_until=T0 + timedelta(days=2))
        assert uids(search.search_studies(session, day1)[1]) == ["1.9.6", "1.9.5", "1.9.4"]
        assert uids(search.search_studies(session, StudyQuery(flagged=True))[1]) == ["1.9.5", "1.9.1"]
        total, page = search.search_studies(session, StudyQuery(limit=4, offset=4, sort="received"))
        assert total == 9 and uids(page) == ["1.9.5", "1.9.6", "1.9.7", "1.9.8"]
        by_p = uids(search.search_studies(session, StudyQuery(sort="-probability", limit=3))[1])
        assert by_p == ["1.9.1", "1.9.5", "1.9.3"]
        (unscored,) = search.search_studies(session, StudyQuery(accession_number="A8"))[1]
        assert unscored.category is None and unscored.instances == 1
        with pytest.raises(ValueError, match="sort must be"):
            search.search_studies(session, StudyQuery(sort="patient_name"))


def test_statistics_and_worklist(corpus: sessionmaker[Any]) -> None:
    with corpus() as session, session.begin():
        access.add_feedback(session, "1.9.1", "agree", None, "dr.a", T0)
        access.add_feedback(session, "1.9.5", "disagree", "old callus", "dr.b", T0)
        access.add_feedback(session, "1.9.2", "agree", None, "dr.a", T0)
        assert access.add_feedback(session, "1.9.9", "agree", None, "dr.a", T0) is None  # not scored
    with corpus() as session:
        stats = search.statistics(session, None, None)
        assert stats.studies_scored == 8
        assert stats.counts == {"positive": 2, "negative": 4, "doubt": 1, "error": 1}
        assert stats.positive_rate == pytest.approx(2 / 7)
        assert [d.counts for d in stats.days] == [
            {"positive": 1, "negative": 1, "doubt": 1},
            {"negative": 2, "positive": 1},
            {"error": 1, "negative": 1},
        ]
        assert stats.turnaround_p50 == pytest.approx(30.0)  # scored 30 s after the (only) instance
        assert stats.failures["studies_in_error"] == 1
        agreement = {(a.category, a.model_version): a for a in stats.agreement}
        assert agreement[("positive", "1.0.0")].agreement_rate == 1.0
        assert agreement[("positive", "1.1.0")].agreement_rate == 0.0
        assert agreement[("positive", "1.1.0")].disagree == 1
        one_day = search.statistics(session, T0 + timedelta(days=1), T0 + timedelta(days=2))
        assert one_day.studies_scored == 3
        assert uids(search.worklist(session)) == ["1.9.1", "1.9.5"]  # both positive: oldest flag first


def rescore(
    sessions: sessionmaker[Any], uid: str, version: int, category: str, probability: float, at: datetime
) -> int:
    """A second result for the study (as after a late image re-opened it)."""
    with sessions() as session, session.begin():
        return results.save_result(
            session,
            results.NewResult(
                study_instance_uid=uid,
                study_version=version,
                model_name="fracwatch-phantom",
                model_version="1.0.0",
                device_uid="2.25.1",
                doubt_threshold=0.3,
                positive_threshold=0.7,
                probability=probability,
                category=category,
                images=[],
                scored_at=at,
                report=None,
                destinations=[],
            ),
        )


def test_flag_rises_but_is_never_lowered(sessions: sessionmaker[Any]) -> None:
    endpoints = [triage_store.Endpoint("hl7", "127.0.0.1:2575"), triage_store.Endpoint("webhook", "http://x/")]
    both = ("positive", "doubt")

    def flag(result_id: int, control: str, categories: tuple[str, ...] = both) -> list[int]:
        with sessions() as session, session.begin():
            return triage_store.raise_flag(session, result_id, categories, endpoints, control, T0)

    def priority(uid: str) -> str | None:
        with sessions() as session:
            return session.scalars(select(Study.triage_priority).where(Study.study_instance_uid == uid)).one()

    first = seed_study(sessions, "1.8.1", received_at=T0, category="doubt", probability=0.4, flag_categories=())
    assert first is not None
    assert len(flag(first, "c1")) == 2 and priority("1.8.1") == "doubt"
    assert flag(first, "c2") == []  # the same result again: nothing new
    raised = rescore(sessions, "1.8.1", 2, "positive", 0.9, T0 + timedelta(hours=1))
    assert len(flag(raised, "c3")) == 2 and priority("1.8.1") == "positive"
    lowered = rescore(sessions, "1.8.1", 3, "doubt", 0.4, T0 + timedelta(hours=2))
    assert flag(lowered, "c4") == [] and priority("1.8.1") == "positive"
    negative = rescore(sessions, "1.8.1", 4, "negative", 0.1, T0 + timedelta(hours=3))
    assert flag(negative, "c5") == [] and priority("1.8.1") == "positive"
    with sessions() as session:
        messages = session.scalars(select(TriageMessage).order_by(TriageMessage.id)).all()
        assert [m.priority for m in messages] == ["doubt", "doubt", "positive", "positive"]
        assert {m.state for m in messages} == {"pending"} and len({m.control_id for m in messages}) == 4
    other = seed_study(sessions, "1.8.2", received_at=T0, category="doubt", probability=0.4, flag_categories=())
    assert other is not None
    assert flag(other, "c6", ("positive",)) == [] and priority("1.8.2") is None  # doubt not configured


def test_tokens_are_stored_hashed_and_revocable(sessions: sessionmaker[Any]) -> None:
    with sessions() as session, session.begin():
        token = access.create_token(session, "alice", "viewer", T0)
        with pytest.raises(access.TokenError, match="role must be"):
            access.create_token(session, "mallory", "root", T0)
        with pytest.raises(access.TokenError, match="exists"):
            access.create_token(session, "alice", "admin", T0)
    with sessions() as session, session.begin():
        stored = session.scalars(select(ApiToken)).one()
        assert stored.token_sha256 == access.token_digest(token) and token not in stored.token_sha256
        principal = access.authenticate(session, token, T0)
        assert principal is not None and principal.role == "viewer"
        assert not principal.may("admin") and principal.may("viewer")
        assert access.authenticate(session, token + "x", T0) is None
        access.record_audit(session, principal, "study.view", "1.2.3", "127.0.0.1", T0)
    with sessions() as session, session.begin():
        access.revoke_token(session, "alice", T0)
        with pytest.raises(access.TokenError, match="no active token"):
            access.revoke_token(session, "alice", T0)
    with sessions() as session, session.begin():
        assert access.authenticate(session, token, T0) is None
        total, rows = access.list_audit(session, actor="alice")
        assert total == 1 and rows[0].target == "1.2.3" and rows[0].client == "127.0.0.1"
        assert access.list_tokens(session)[0].last_used_at is not None


def test_retention_candidates(sessions: sessionmaker[Any], tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    seed_study(sessions, "1.7.1", received_at=T0, spool=spool)  # scored: may go
    seed_study(sessions, "1.7.2", received_at=T0, category=None, spool=spool)  # still receiving: kept
    seed_study(sessions, "1.7.3", received_at=T0, spool=spool, destinations=("PACS@127.0.0.1:1",))  # SR pending
    seed_study(sessions, "1.7.4", received_at=T0 + timedelta(days=20), spool=spool)  # too young
    cutoff = T0 + timedelta(days=10)
    with sessions() as session:
        items = retention.purge_candidates(session, cutoff)
    assert {(i.kind, i.study_instance_uid) for i in items} == {
        ("instance", "1.7.1"),
        ("produced", "1.7.1"),
        ("instance", "1.7.3"),
    }
    with sessions() as session, session.begin():
        retention.mark_purged(session, items, cutoff)
    with sessions() as session:
        assert retention.purge_candidates(session, cutoff) == []
        detail = search.study_detail(session, "1.7.1")
        assert detail is not None and all(i.purged for i in detail.instances)
        assert detail.results[0].objects[0].purged
        assert session.scalars(select(Delivery.state)).all() == ["pending"]


def test_an_error_result_has_no_turnaround(sessions: sessionmaker[Any]) -> None:
    """Nothing is sent to PACS for a study whose every image failed: no SR, no flag, so no turnaround."""
    seed_study(sessions, "1.8.1", received_at=T0, category="error", probability=0.0)
    seed_study(sessions, "1.8.2", received_at=T0, category="negative", probability=0.1)
    with sessions() as session:
        rows = {r.study_instance_uid: r for r in results.list_results(session, results.ResultFilter())}
        stats = search.statistics(session, None, None)
    assert rows["1.8.1"].category == "error" and rows["1.8.1"].turnaround_seconds is None
    assert rows["1.8.2"].turnaround_seconds is not None and rows["1.8.2"].turnaround_seconds >= 0
    assert stats.turnaround_p50 == rows["1.8.2"].turnaround_seconds  # the error study is not in the figure


def test_dashboard_sessions_end_on_expiry_sign_out_and_revocation(sessions: sessionmaker[Any]) -> None:
    with sessions() as session, session.begin():
        token = access.create_token(session, "nurse", "viewer", T0)
        principal = access.authenticate(session, token, T0)
        assert principal is not None
        key = access.open_session(session, principal, T0, timedelta(hours=12))
        other = access.open_session(session, principal, T0, timedelta(hours=12))
    assert token not in key and key != other
    with sessions() as session, session.begin():
        assert access.session_principal(session, key, T0 + timedelta(hours=1)) == principal
        assert access.session_principal(session, token, T0) is None  # the API token is not a session key
        assert access.session_principal(session, key, T0 + timedelta(hours=12)) is None  # expired
        access.close_session(session, key)
        assert access.session_principal(session, key, T0 + timedelta(hours=1)) is None  # signed out
        assert access.session_principal(session, other, T0 + timedelta(hours=1)) == principal
        access.revoke_token(session, "nurse", T0 + timedelta(hours=2))
        assert access.session_principal(session, other, T0 + timedelta(hours=3)) is None  # its token revoked
    with sessions() as session, session.begin():  # expired sessions are swept when the next one opens
        access.open_session(session, principal, T0 + timedelta(days=1), timedelta(hours=12))
    with sessions() as session:
        assert len(session.scalars(select(DashboardSession)).all()) == 1
