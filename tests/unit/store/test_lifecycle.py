"""Recording instances, lifecycle transitions, results and the outbox against real SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, text
from sqlalchemy.orm import sessionmaker

from fracwatch.domain import InstanceHeader, ReceivedInstance, RecordOutcome
from fracwatch.store import db, instances, search
from fracwatch.store.instances import HandOver
from fracwatch.store.search import StudyQuery

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


def received(
    sop: str, study: str = "1.2.3", series: str = "1.2.3.1", at: datetime = T0, accession: str | None = "ACC1"
) -> ReceivedInstance:
    header = InstanceHeader(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="DX",
        body_part="WRIST",
        accession_number=accession,
    )
    return ReceivedInstance(header, Path(f"/spool/{sop}.dcm"), 100, "MODALITY", at)


def record(sessions: sessionmaker[Any], item: ReceivedInstance) -> RecordOutcome:
    with sessions() as session, session.begin():
        return instances.record_instance(session, item)


def test_schema_at_head(engine: Engine) -> None:
    assert db.current_revision(engine) == db.head_revision()
    assert {"studies", "series", "instances"} <= set(inspect(engine).get_table_names())
    db.upgrade(engine)  # idempotent


def test_record_and_resend(sessions: sessionmaker[Any]) -> None:
    first = record(sessions, received("1.2.3.1.1"))
    again = record(sessions, received("1.2.3.1.1", at=T0 + timedelta(minutes=5)))
    assert first.created and not again.created
    with sessions() as session:
        (summary,) = search.search_studies(session, StudyQuery())[1]
    assert summary.instances == 1 and summary.series == 1
    assert summary.last_received_at == T0  # a resend does not extend the quiet period
    assert summary.first_received_at.tzinfo is not None


def test_completion_waits_for_quiet_period(sessions: sessionmaker[Any]) -> None:
    record(sessions, received("1.2.3.1.1", at=T0))
    record(sessions, received("1.2.3.1.2", at=T0 + timedelta(seconds=20)))
    with sessions() as session, session.begin():
        assert instances.complete_stable_studies(session, T0 + timedelta(seconds=45), 30) == []
    with sessions() as session, session.begin():
        handed = instances.complete_stable_studies(session, T0 + timedelta(seconds=51), 30)
    assert handed == [HandOver("1.2.3", 1)]
    with sessions() as session, session.begin():  # not handed over twice
        assert instances.complete_stable_studies(session, T0 + timedelta(seconds=99), 30) == []
        assert instances.pending_hand_overs(session) == [HandOver("1.2.3", 1)]
        assert instances.mark_ready(session, HandOver("1.2.3", 1), T0 + timedelta(seconds=100))
        assert instances.pending_hand_overs(session) == []


def test_late_instance_reopens_as_new_version(sessions: sessionmaker[Any]) -> None:
    record(sessions, received("1.2.3.1.1"))
    with sessions() as session, session.begin():
        instances.complete_stable_studies(session, T0 + timedelta(minutes=1), 30)
    outcome = record(sessions, received("1.2.3.2.1", series="1.2.3.2", at=T0 + timedelta(minutes=2)))
    assert outcome.reopened and outcome.study_version == 2
    with sessions() as session, session.begin():
        # the stale hand-over of version 1 must not mark the re-opened study ready
        assert not instances.mark_ready(session, HandOver("1.2.3", 1), T0 + timedelta(minutes=2))
        (summary,) = search.search_studies(session, StudyQuery())[1]
        assert (summary.state, summary.version, summary.instances, summary.series) == ("receiving", 2, 2, 2)
    resend = record(sessions, received("1.2.3.1.1", at=T0 + timedelta(minutes=3)))
    assert not resend.created and not resend.reopened


def test_list_filters(sessions: sessionmaker[Any]) -> None:
    record(sessions, received("1.1.1", study="1.1", series="1.1.0", at=T0, accession="A1"))
    record(sessions, received("2.1.1", study="2.1", series="2.1.0", at=T0 + timedelta(days=1), accession="A2"))
    record(sessions, received("3.1.1", study="3.1", series="3.1.0", at=T0 + timedelta(days=2), accession="A3"))
    with sessions() as session, session.begin():
        instances.complete_stable_studies(session, T0 + timedelta(days=1, hours=1), 30)

    def uids(**kwargs: Any) -> list[str]:
        with sessions() as session:
            return [s.study_instance_uid for s in search.search_studies(session, StudyQuery(**kwargs))[1]]

    assert uids() == ["3.1", "2.1", "1.1"]
    assert uids(state="complete") == ["2.1", "1.1"]
    assert uids(accession_number="A2") == ["2.1"]
    assert uids(received_since=T0 + timedelta(hours=12)) == ["3.1", "2.1"]
    assert uids(received_until=T0 + timedelta(hours=12)) == ["1.1"]
    assert uids(limit=1) == ["3.1"]


def test_naive_datetimes_are_refused(sessions: sessionmaker[Any]) -> None:
    with pytest.raises(Exception, match="naive"):
        record(sessions, received("9.9", at=datetime(2026, 1, 1)))


def test_paths_are_stored_relative_to_the_data_root_and_read_under_each_hosts_root(db_url: str, tmp_path: Path) -> None:
    here, there = tmp_path / "host-a" / "data", tmp_path / "host-b" / "mnt"
    engine_a = db.make_engine(db_url, here)
    engine_b = db.make_engine(db_url, there)
    raw = db.make_engine(db_url)
    try:
        db.upgrade(engine_a)
        inside = ReceivedInstance(received("1.2.3.9.1").header, here / "spool" / "1.2.3" / "a.dcm", 100, "M", T0)
        outside = ReceivedInstance(received("1.2.3.9.2").header, Path("/elsewhere/b.dcm"), 100, "M", T0)
        record(db.session_factory(engine_a), inside)
        record(db.session_factory(engine_a), outside)
        with raw.connect() as connection:
            stored = set(connection.scalars(text("SELECT path FROM instances")))
        assert stored == {"spool/1.2.3/a.dcm", "/elsewhere/b.dcm"}
        with db.session_factory(engine_b)() as session:
            assert instances.held_paths(session) == {str(there / "spool/1.2.3/a.dcm"), "/elsewhere/b.dcm"}
        with db.session_factory(engine_a)() as session:
            assert str(here / "spool/1.2.3/a.dcm") in instances.held_paths(session)
    finally:
        for engine in (engine_a, engine_b, raw):
            engine.dispose()
