"""A data directory belongs to one database: the first start records the database's identity in it, and every
later start (receiver or worker host) checks it.

Without this, ``--db`` pointed at a new, empty database beside an existing spool made the start-up reconciler
re-register every spooled image and score old studies again (new SRs sent to PACS a second time).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fracwatch.errors import DatabaseError
from fracwatch.store.models import Installation

MARKER = "database.json"


@dataclass(frozen=True)
class Owner:
    """The database a data directory was first used with."""

    database_uid: str
    url: str


def database_uid(sessions: sessionmaker[Session]) -> str:
    """This database's identity (written once, by migration 0005)."""
    with sessions() as session:
        uid = session.scalar(select(Installation.database_uid))
    if uid is None:
        raise DatabaseError("the database has no installation row (migration 0005 did not run)")
    return str(uid)


def claim(data_dir: Path, sessions: sessionmaker[Session], url: str) -> None:
    """Record ``url``'s database as the owner of ``data_dir``, or refuse (one line, naming both) when the data
    directory belongs to another database.

    A data directory with no record (new, written by an older fracwatch, or its record removed by an admin on
    purpose) is claimed: the reconciler then registers whatever the spool holds, as after a power loss."""
    uid = database_uid(sessions)
    marker = data_dir / MARKER
    owner = _read(marker)
    if owner is None:
        _write(marker, Owner(uid, url))
        return
    if owner.database_uid != uid:
        raise DatabaseError(
            f"the data directory {data_dir} belongs to the database {owner.url} (id {owner.database_uid}), not to "
            f"{url} (id {uid}): start with --db {owner.url} or another --data-dir (removing {marker} lets this "
            "database re-index the spool)"
        )


def _read(marker: Path) -> Owner | None:
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        return Owner(str(recorded["database_uid"]), str(recorded["url"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatabaseError(f"cannot read {marker}: {exc}") from None


def _write(marker: Path, owner: Owner) -> None:
    """Atomically (receivers sharing a data directory may start together; they write the same content)."""
    partial = marker.with_name(f".{marker.name}.{os.getpid()}")
    try:
        partial.write_text(json.dumps({"database_uid": owner.database_uid, "url": owner.url}) + "\n", "utf-8")
        os.replace(partial, marker)
    except OSError as exc:
        raise DatabaseError(f"cannot write {marker}: {exc.strerror}") from None
