"""Hard kills, graceful stops and a full disk, against a real ``fracwatch serve`` process."""

from __future__ import annotations

import resource
import signal
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests import dicomgen
from tests.conftest import free_port, send_files
from tests.serveproc import ServeProcess, serve_args

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def make_files(directory: Path, count: int, rows: int = 724, columns: int = 724) -> list[Path]:
    """``count`` single-image DX studies of about rows*columns*2 bytes each."""
    ids = dicomgen.StudyIds()
    series = str(generate_uid())
    template = dicomgen.image(ids, series_uid=series, rows=rows, columns=columns)
    files = []
    for index in range(count):
        template.SOPInstanceUID = generate_uid()
        template.InstanceNumber = index + 1
        files.append(dicomgen.save(template, directory / f"img{index:04d}.dcm"))
    return files


def stored_rows(data_dir: Path) -> dict[str, str]:
    with sqlite3.connect(data_dir / "fracwatch.db") as conn:
        return dict(conn.execute("select sop_instance_uid, path from instances"))


class Sender(threading.Thread):
    """Sends files one by one, remembering which were acknowledged with 0x0000."""

    def __init__(self, port: int, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.files = files
        self.acked: list[Path] = []
        self.enough = threading.Event()
        self.threshold = 10

    def run(self) -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(dicomgen.DX_PRESENTATION, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", self.port, ae_title="FRACWATCH")
        try:
            for path in self.files:
                if not assoc.is_established:
                    return
                response = assoc.send_c_store(path)
                if "Status" in response and int(response.Status) == 0:
                    self.acked.append(path)
                    if len(self.acked) >= self.threshold:
                        self.enough.set()
                else:
                    return
        finally:
            self.enough.set()
            if assoc.is_established:
                assoc.release()


def interrupt_transfer(
    data_dir: Path, port: int, files: list[Path], interrupt: Callable[[ServeProcess], object]
) -> tuple[ServeProcess, Sender]:
    """Start ``fracwatch serve``, send ``files`` one by one, ``interrupt`` it once 10 are acknowledged."""
    server = ServeProcess(serve_args(data_dir, port))
    try:
        server.wait_for("listening as")
        sender = Sender(port, files)
        sender.start()
        assert sender.enough.wait(120)
        interrupt(server)  # mid-transfer: the sender is still sending
        sender.join(60)
    finally:
        server.stop()
    return server, sender


def test_sigkill_during_transfer_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    files = make_files(tmp_path / "src", 60)
    data_dir = tmp_path / "data"
    port = free_port()
    _, sender = interrupt_transfer(data_dir, port, files, ServeProcess.kill)
    acked = list(sender.acked)
    assert 10 <= len(acked) < len(files), "the kill should land during the transfer"

    restarted = ServeProcess(serve_args(data_dir, port))
    try:
        restarted.wait_for("listening as")
        rows = stored_rows(data_dir)
        for path in acked:
            uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert uid in rows, f"acknowledged instance {uid} lost"
            spooled = Path(rows[uid])
            assert dcmread(spooled).PixelData == dcmread(path).PixelData
        assert list((data_dir / "spool" / ".tmp").iterdir()) == []
        # the sender resends what it did not get acknowledged; nothing is duplicated
        assert send_files(port, files) == [0] * len(files)
        assert len(stored_rows(data_dir)) == len(files)
    finally:
        assert restarted.terminate() == 0


def test_sigterm_finishes_in_flight_writes_and_exits_cleanly(tmp_path: Path) -> None:
    files = make_files(tmp_path / "src", 40)
    data_dir = tmp_path / "data"
    codes: list[int] = []
    server, sender = interrupt_transfer(data_dir, free_port(), files, lambda s: codes.append(s.terminate()))
    assert codes == [0], server.output
    assert "fracwatch stopped" in server.output
    rows = stored_rows(data_dir)
    for path in sender.acked:
        assert dcmread(path, stop_before_pixels=True).SOPInstanceUID in rows
    # the database was closed cleanly: the WAL was checkpointed away
    assert not (data_dir / "fracwatch.db-wal").exists() or (data_dir / "fracwatch.db-wal").stat().st_size == 0


def _limit_file_size() -> None:
    # A real out-of-space condition for this process: writes past 1.5 MB fail with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, 1_500_000))


def test_disk_full_answers_a700_and_leaves_no_partial_file(tmp_path: Path) -> None:
    big = make_files(tmp_path / "big", 1, rows=1024, columns=1024)  # 2 MB: cannot be written
    small = make_files(tmp_path / "small", 1, rows=64, columns=64)
    data_dir = tmp_path / "data"
    port = free_port()
    server = ServeProcess(serve_args(data_dir, port), preexec_fn=_limit_file_size)
    try:
        server.wait_for("listening as")
        assert send_files(port, big) == [0xA700]
        assert send_files(port, small) == [0x0000]
        server.wait_for("refusing instance")
    finally:
        code = server.terminate()
    assert code == 0
    spooled = sorted(p.name for p in (data_dir / "spool").rglob("*") if p.is_file())
    assert spooled == [dcmread(small[0], stop_before_pixels=True).SOPInstanceUID + ".dcm"]
    assert len(stored_rows(data_dir)) == 1
