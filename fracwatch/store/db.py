"""Engine creation and schema migration (Alembic); one engine per process."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from alembic import command
from fracwatch.errors import DatabaseError
from fracwatch.store.models import DATA_ROOT

LOGGER = logging.getLogger(__name__)


def normalise_url(url: str) -> str:
    """Use the psycopg 3 driver for bare ``postgresql://`` URLs (psycopg2 is not a dependency)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event open transactions itself (see below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL is safe in WAL against process crashes; on power loss the reconciler re-registers
        # any spooled file whose row was lost (the files themselves are fsynced).
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front, so concurrent association threads wait on
        # busy_timeout instead of failing with SQLITE_BUSY when a read transaction upgrades to a write.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, data_root: Path | None = None) -> Engine:
    """Create the process's engine for ``url`` (SQLite file or PostgreSQL). File paths in the database are
    stored relative to ``data_root`` (this host's data directory; ``models.DataPath``) and read back under it."""
    engine = _engine(normalise_url(url))
    if data_root is not None:
        setattr(engine.dialect, DATA_ROOT, Path(os.path.abspath(data_root)))
    return engine


def _engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseError(f"invalid database URL: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 30, "check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    try:
        return create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20)
    except (ArgumentError, ImportError) as exc:
        raise DatabaseError(f"unsupported database URL {parsed.render_as_string()}: {exc}") from None


class DatabaseLock:
    """An exclusive lock on a SQLite database's ``.lock`` file beside it, held for the daemon's lifetime."""

    def __init__(self, path: Path, handle: IO[str]) -> None:
        self.path = path
        self._handle = handle

    def release(self) -> None:
        """Let another process have the database (the kernel also drops it if this process dies)."""
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()


def is_sqlite(url: str) -> bool:
    """True for a SQLite URL."""
    try:
        return make_url(normalise_url(url)).get_backend_name() == "sqlite"
    except ArgumentError:
        return False


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for PostgreSQL or an in-memory database."""
    try:
        parsed = make_url(normalise_url(url))
    except ArgumentError as exc:
        raise DatabaseError(f"invalid database URL: {exc}") from None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def lock_database(url: str) -> DatabaseLock | None:
    """On a SQLite file, make sure no other fracwatch daemon uses it; None for PostgreSQL (shared by design).

    Two daemons on one SQLite file would score each other's studies and send SRs twice: the second is refused.
    """
    database = sqlite_file(url)
    if database is None:
        return None
    path = Path(f"{database}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise DatabaseError(
            f"another fracwatch process (pid {holder}) already uses {database}: a SQLite database serves "
            "one daemon; to run several, share a PostgreSQL database"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return DatabaseLock(path, handle)


def session_factory(engine: Engine) -> sessionmaker[Any]:
    """The sessionmaker used for every unit of work."""
    return sessionmaker(engine, expire_on_commit=False)


def migrations_dir() -> Path:
    """The Alembic script directory (the top-level ``alembic/``, packaged as ``fracwatch._migrations``)."""
    spec = importlib.util.find_spec("fracwatch._migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "alembic"


def alembic_config(engine: Engine) -> Config:
    """An Alembic config bound to ``engine``."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine) -> str | None:
    """Migrate the schema to the newest revision; return it."""
    config = alembic_config(engine)
    try:
        with _migration_lock(engine):
            command.upgrade(config, "head")
        return current_revision(engine)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot migrate {engine.url.render_as_string()}: {exc}") from exc


_MIGRATION_LOCK = 0x66726163  # "frac": the advisory lock every fracwatch process takes to migrate


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """On PostgreSQL, one process migrates at a time (several daemons starting together on a new database)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
            connection.commit()


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None if never migrated)."""
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read {engine.url.render_as_string()}: {exc}") from exc


def head_revision() -> str | None:
    """The newest revision shipped with this version of fracwatch."""
    script = ScriptDirectory(str(migrations_dir()))
    return script.get_current_head()
