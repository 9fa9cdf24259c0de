"""Read-only views the CLI (and later the API) use, with their own short-lived engine."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from fracwatch.config import Settings
from fracwatch.errors import DatabaseError
from fracwatch.store import db, repository
from fracwatch.store.repository import StudyFilter, StudySummary


def recent_studies(settings: Settings, filters: StudyFilter) -> Sequence[StudySummary]:
    """The study list for ``fracwatch studies``."""
    engine = db.make_engine(settings.database_url)
    try:
        if db.current_revision(engine) is None:
            raise DatabaseError(
                f"{engine.url.render_as_string()} holds no fracwatch schema; run 'fracwatch db upgrade'"
            )
        with db.session_factory(engine)() as session:
            return repository.list_studies(session, filters)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read {engine.url.render_as_string()}: {exc}") from exc
    finally:
        engine.dispose()


def upgrade_database(settings: Settings) -> str | None:
    """Migrate the configured database to head; return the revision."""
    engine = db.make_engine(settings.database_url)
    try:
        return db.upgrade(engine)
    finally:
        engine.dispose()
