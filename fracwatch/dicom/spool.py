"""The durable spool: received instances as DICOM Part 10 files, written so an acknowledged image survives a crash.

Every write goes to a temporary file in ``<spool>/.tmp``, is fsynced, renamed into
``<spool>/<study>/<series>/<sop>.dcm`` and the directory entry fsynced. A failure leaves no partial file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from fracwatch.errors import SpoolError

LOGGER = logging.getLogger(__name__)

SUFFIX = ".dcm"
TMP_DIR = ".tmp"
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def safe_component(uid: str) -> str:
    """Return a file-name component for ``uid``: the UID itself when it is a well-formed UID, else a hash.

    Never returns ``.``/``..``, a separator or anything a path could be tricked with.
    """
    uid = uid.strip().rstrip("\x00")
    if _UID_RE.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class Spool:
    """A directory of received instances."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / TMP_DIR

    def prepare(self) -> None:
        """Create the spool and remove temporary files left by a crash (they were never acknowledged)."""
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool {self.root}: {exc.strerror}") from exc
        for leftover in self.tmp_dir.iterdir():
            LOGGER.info("removing unacknowledged temporary file %s", leftover.name)
            leftover.unlink(missing_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where the instance with these UIDs lives."""
        return (
            self.root
            / safe_component(study_uid)
            / safe_component(series_uid)
            / (safe_component(sop_instance_uid) + SUFFIX)
        )

    def write(self, destination: Path, chunks: Iterable[bytes | memoryview]) -> int:
        """Write ``chunks`` durably to ``destination``; return the number of bytes written.

        Raises :class:`SpoolError` on any I/O failure, leaving neither a temporary nor a partial file.
        """
        tmp_name: str | None = None
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".part")
            size = 0
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            self._ensure_dir(destination.parent)
            os.replace(tmp_name, destination)
            tmp_name = None
            _fsync_dir(destination.parent)
            return size
        except OSError as exc:
            raise SpoolError(f"cannot write {destination.name}: {exc.strerror or exc}") from exc
        finally:
            if tmp_name is not None:
                _unlink_quietly(Path(tmp_name))

    def _ensure_dir(self, directory: Path) -> None:
        missing = []
        current = directory
        while not current.exists() and current != self.root:
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
            _fsync_dir(path.parent)

    def files(self) -> Iterator[Path]:
        """Every instance file in the spool."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d != TMP_DIR]
            for name in filenames:
                if name.endswith(SUFFIX):
                    yield Path(dirpath) / name


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        LOGGER.exception("could not remove temporary file %s", path.name)
