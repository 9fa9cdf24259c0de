"""What the admin CLI (and later the API) asks of the database, each call with its own short-lived engine."""

from __future__ import annotations

import getpass
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from fracwatch.config import Settings
from fracwatch.errors import DatabaseError
from fracwatch.service.retention import cutoff_for, purge
from fracwatch.store import access, db, instances, results, retention, search
from fracwatch.store import outbox as outbox_store
from fracwatch.store.access import Principal, TokenSummary
from fracwatch.store.outbox import DeliverySummary, ResendOutcome
from fracwatch.store.results import ResultFilter, ResultSummary
from fracwatch.store.retention import PurgeItem
from fracwatch.store.search import StudyQuery, StudyRow

T = TypeVar("T")


def recent_studies(settings: Settings, query: StudyQuery) -> Sequence[StudyRow]:
    """The study list for ``fracwatch studies`` (the API's study search, first page)."""
    return _with_session(settings, _audited("cli.studies", repr(query), _study_page, query), True)


def _study_page(session: Session, query: StudyQuery) -> list[StudyRow]:
    return search.search_studies(session, query)[1]


def upgrade_database(settings: Settings) -> str | None:
    """Migrate the configured database to head; return the revision."""
    engine = db.make_engine(settings.database_url, settings.data_dir)
    try:
        return db.upgrade(engine)
    finally:
        engine.dispose()


def cli_principal() -> Principal:
    """Who runs a CLI command that reads study data, for the audit trail: the operating-system user."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Principal(0, f"cli:{user}"[:64], "admin")


def _audited(action: str, target: str, query: Callable[[Session, Any], T], argument: Any) -> Callable[[Session], T]:
    """``query(session, argument)``, with an audit row written in the same transaction."""

    def run(session: Session) -> T:
        access.record_audit(session, cli_principal(), action, target[:2000], "local", datetime.now(UTC))
        return query(session, argument)

    return run


def _with_session(settings: Settings, action: Callable[[Session], T], write: bool = False) -> T:
    engine = db.make_engine(settings.database_url, settings.data_dir)
    try:
        _check_revision(engine)
        with db.session_factory(engine)() as session:
            if write:
                with session.begin():
                    return action(session)
            return action(session)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot use {engine.url.render_as_string()}: {exc}") from exc
    finally:
        engine.dispose()


def _check_revision(engine: Engine) -> None:
    revision, head = db.current_revision(engine), db.head_revision()
    if revision != head:
        found = "no fracwatch schema" if revision is None else f"schema revision {revision}, not {head}"
        raise DatabaseError(f"{engine.url.render_as_string()} holds {found}; run 'fracwatch db upgrade'")


def scored_results(settings: Settings, filters: ResultFilter) -> Sequence[ResultSummary]:
    """The result list for ``fracwatch results``."""
    return _with_session(settings, _audited("cli.results", repr(filters), results.list_results, filters), True)


def outbox(settings: Settings, states: Sequence[str]) -> Sequence[DeliverySummary]:
    """Deliveries for ``fracwatch outbox``."""
    return _with_session(settings, lambda session: outbox_store.list_deliveries(session, states))


def resend(settings: Settings, study_instance_uid: str) -> ResendOutcome:
    """Queue the study's latest SR again for every configured destination that has not acknowledged it."""
    destinations = [str(d) for d in settings.destinations]
    now = datetime.now(UTC)
    return _with_session(
        settings, lambda session: outbox_store.requeue_study(session, study_instance_uid, destinations, now), write=True
    )


def requeue_failed(settings: Settings, study_instance_uid: str) -> int | None:
    """Put a dead-lettered study back to complete; its version, or None if it is not failed."""
    now = datetime.now(UTC)

    def requeue(session: Session) -> int | None:
        hand_over = instances.requeue_failed(session, study_instance_uid, now)
        return None if hand_over is None else hand_over.version

    return _with_session(settings, requeue, write=True)


def create_token(settings: Settings, name: str, role: str) -> str:
    """A new API token (returned once; only its digest is stored)."""
    now = datetime.now(UTC)
    return _with_session(settings, lambda session: access.create_token(session, name, role, now), write=True)


def revoke_token(settings: Settings, name: str) -> None:
    """Revoke the named token."""
    now = datetime.now(UTC)
    _with_session(settings, lambda session: access.revoke_token(session, name, now), write=True)


def tokens(settings: Settings) -> list[TokenSummary]:
    """Every token (names, roles, dates; never the tokens)."""
    return _with_session(settings, access.list_tokens)


def purge_preview(settings: Settings, days: float) -> list[PurgeItem]:
    """The files a retention run would delete now."""
    cutoff = cutoff_for(days, datetime.now(UTC))
    return _with_session(settings, lambda session: retention.purge_candidates(session, cutoff))


def purge_now(settings: Settings, days: float) -> int:
    """Run retention once from the CLI (the daemon runs it on its schedule)."""
    engine = db.make_engine(settings.database_url, settings.data_dir)
    try:
        _check_revision(engine)
        return purge(db.session_factory(engine), days)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot use {engine.url.render_as_string()}: {exc}") from exc
    finally:
        engine.dispose()
