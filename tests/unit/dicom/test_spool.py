"""The durable spool on a real filesystem."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fracwatch.dicom import spool as spool_module
from fracwatch.dicom.spool import Spool, safe_component
from fracwatch.errors import SpoolError


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.prepare()
    return s


def test_write_places_file_under_uid_path(spool: Spool) -> None:
    path = spool.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    size = spool.write(path, [b"abc", memoryview(b"defg")])
    assert size == 7
    assert path == spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert path.read_bytes() == b"abcdefg"
    assert list(spool.tmp_dir.iterdir()) == []
    assert list(spool.files()) == [path]


@pytest.mark.parametrize("uid", ["..", "../../etc/passwd", "1.2/3", "", "1.2.3 ", "a" * 100, ".", "1..2"])
def test_unsafe_uids_never_escape_the_spool(spool: Spool, uid: str) -> None:
    component = safe_component(uid)
    assert "/" not in component and component not in ("", ".", "..")
    path = spool.path_for(uid, uid, uid)
    assert path.resolve().is_relative_to(spool.root.resolve())


def test_well_formed_uid_kept_and_hash_is_stable() -> None:
    assert safe_component("1.2.840.10008.1") == "1.2.840.10008.1"
    assert safe_component("1.2.3 ") == "1.2.3"  # trailing padding is not part of a UID
    assert safe_component("bad uid") == safe_component("bad uid")
    assert safe_component("bad uid") != safe_component("bad uid2")


def test_io_error_leaves_no_partial_file(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(spool_module.os, "fsync", no_space)
    path = spool.path_for("1.2", "1.2.3", "1.2.3.4")
    with pytest.raises(SpoolError, match="No space left"):
        spool.write(path, [b"x" * 1000])
    assert not path.exists()
    assert list(spool.tmp_dir.iterdir()) == []


def test_failing_chunk_source_leaves_nothing(spool: Spool) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"first"
        raise OSError(errno.EIO, "read error")

    path = spool.path_for("1.2", "1.2.3", "1.2.3.5")
    with pytest.raises(SpoolError):
        spool.write(path, chunks())
    assert not path.exists() and list(spool.tmp_dir.iterdir()) == []


def test_prepare_removes_leftover_temporary_files(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool")
    s.tmp_dir.mkdir(parents=True)
    (s.tmp_dir / "abc.part").write_bytes(b"half")
    s.prepare()
    assert list(s.tmp_dir.iterdir()) == []


def test_rewrite_replaces_atomically(spool: Spool) -> None:
    path = spool.path_for("1.2", "1.2.3", "1.2.3.6")
    spool.write(path, [b"one"])
    spool.write(path, [b"two"])
    assert path.read_bytes() == b"two"
