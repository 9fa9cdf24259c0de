"""Hard kills, graceful stops and a full disk, against a real ``fracwatch serve`` process."""

from __future__ import annotations

import random
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests import dicomgen
from tests.conftest import free_port, send_files
from tests.pacs import running_pacs
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
    """Read raw (the daemon may be dead): paths are stored relative to the data directory."""
    with sqlite3.connect(data_dir / "fracwatch.db") as conn:
        return {uid: str(data_dir / path) for uid, path in conn.execute("select sop_instance_uid, path from instances")}


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


def test_a_full_tmpfs_answers_a700_keeps_no_partial_file_and_recovers(tmp_path: Path) -> None:
    """The spool on a 3 MB tmpfs (a real ENOSPC): an image too large is refused, nothing half-written stays,
    and the next image that fits is stored."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=False)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        big = make_files(tmp_path / "big", 1, rows=1400, columns=1400)  # 3.9 MB: cannot fit
        small = make_files(tmp_path / "small", 2, rows=64, columns=64)
        database = f"sqlite:///{tmp_path / 'db' / 'fracwatch.db'}"  # the database on the big disk
        created = subprocess.run(
            [sys.executable, "-m", "fracwatch", "db", "upgrade", "--db", database], capture_output=True, check=False
        )
        assert created.returncode == 0, created.stderr
        port = free_port()
        server = ServeProcess(serve_args(mount / "data", port, "--db", database))
        try:
            server.wait_for("listening as")
            assert send_files(port, small[:1]) == [0x0000]
            assert send_files(port, big) == [0xA700]
            assert send_files(port, small[1:]) == [0x0000]  # the space the refused one took is free again
        finally:
            code = server.terminate()
        assert code == 0, server.output
        assert "No space left on device" in server.output or "refusing instance" in server.output
        left = sorted(p.name for p in (mount / "data" / "spool").rglob("*") if p.is_file())
        assert left == sorted(dcmread(p, stop_before_pixels=True).SOPInstanceUID + ".dcm" for p in small)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_kill_9_during_delivery_loses_no_sr_and_resends_at_most_the_one_in_flight(tmp_path: Path) -> None:
    """SIGKILL of the daemon (and its scoring processes) at seeded random moments while SRs go to a slow PACS:
    after restarts every study's SR arrives, each study gets one SR object (a resend repeats the same SOP
    Instance UID, which a PACS keeps once), and each kill costs at most the one C-STORE that was in flight."""
    rng = random.Random(35)
    files = []
    for index in range(8):
        ids = dicomgen.StudyIds(accession=f"KILL-{index}")
        files.append(dicomgen.save(dicomgen.image(ids, rows=64, columns=64, seed=index), tmp_path / f"{index}.dcm"))
    studies = {str(dcmread(path, stop_before_pixels=True).StudyInstanceUID) for path in files}
    data_dir, port = tmp_path / "data", free_port()
    env = {"FRACWATCH_COMPLETION_INTERVAL": "0.2", "FRACWATCH_DELIVERY_INTERVAL": "0.3"}
    kills = 0
    with running_pacs(delay=0.4) as pacs:
        args = serve_args(data_dir, port, "--stable-after", "1", "--destination", pacs.destination)
        server = ServeProcess(args, env=env)
        try:
            server.wait_for("listening as")
            assert send_files(port, files) == [0] * len(files)
            pacs.wait_for(1, timeout=120)
            for _ in range(3):
                time.sleep(rng.uniform(0.1, 1.5))
                server.kill_group()
                kills += 1
                server = ServeProcess(args, env=env)
                server.wait_for("listening as")
            deadline = time.monotonic() + 180
            while {str(ds.StudyInstanceUID) for ds in pacs.received} != studies and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(3)  # room for a late resend
        finally:
            assert server.terminate() == 0, server.output
        received = list(pacs.received)
    by_study: dict[str, list[str]] = defaultdict(list)
    for ds in received:
        by_study[str(ds.StudyInstanceUID)].append(str(ds.SOPInstanceUID))
    assert set(by_study) == studies, f"SRs for {len(by_study)} of {len(studies)} studies"
    assert all(len(set(uids)) == 1 for uids in by_study.values()), by_study  # one SR object per study
    resent = sum(len(uids) - 1 for uids in by_study.values())
    print(f"{kills} kills, {len(received)} C-STOREs for {len(studies)} SRs ({resent} resent)")
    assert resent <= kills
