"""A running daemon (in-process) receives real associations on 127.0.0.1 into a real database."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from fracwatch.config import Settings
from fracwatch.daemon import Daemon, RunningDaemon
from fracwatch.store.instances import HandOver
from fracwatch.store.models import Instance, Series, Study
from tests import dicomgen
from tests.conftest import FakeClock, echo_status, send_files

pytestmark = pytest.mark.timeout(120)


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta group: the dataset as encoded on the wire."""
    ds = dcmread(path, stop_before_pixels=True)
    meta_length = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return path.read_bytes()[meta_length:]


def build_study(tmp_path: Path) -> tuple[dicomgen.StudyIds, list[Path]]:
    """DX (two images), CR, an SR document, JPEG-LS and JPEG 2000 images, deflate and implicit VR."""
    ids = dicomgen.StudyIds()
    dx_series = str(generate_uid())
    files = [
        dicomgen.save(dicomgen.image(ids, series_uid=dx_series, seed=1), tmp_path / "dx1.dcm"),
        dicomgen.save(dicomgen.image(ids, series_uid=dx_series, seed=2), tmp_path / "dx2.dcm"),
        dicomgen.save(
            dicomgen.image(ids, modality="CR", sop_class=dicomgen.CR_IMAGE, series_number=2, photometric="MONOCHROME1"),
            tmp_path / "cr.dcm",
            ImplicitVRLittleEndian,
        ),
        dicomgen.save(dicomgen.basic_text_sr(ids), tmp_path / "sr.dcm"),
        dicomgen.save(dicomgen.image(ids, series_number=3, seed=3), tmp_path / "jls.dcm", JPEGLSLossless),
        dicomgen.save(dicomgen.image(ids, series_number=4, seed=4), tmp_path / "j2k.dcm", JPEG2000Lossless),
        dicomgen.save(dicomgen.image(ids, series_number=5, seed=5), tmp_path / "rle.dcm", RLELossless),
        dicomgen.save(
            dicomgen.image(ids, series_number=6, seed=6),
            tmp_path / "deflate.dcm",
            DeflatedExplicitVRLittleEndian,
        ),
    ]
    return ids, files


def test_study_lands_on_disk_byte_identical_and_in_database(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, db_url: str
) -> None:
    daemon = start_daemon(db_url=db_url)
    ids, files = build_study(tmp_path / "src")

    statuses = send_files(daemon.scp.address[1], files)

    assert statuses == [0] * len(files)
    with daemon.sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == ids.study_uid)).one()
        instances = session.scalars(select(Instance).where(Instance.study_id == study.id)).all()
        n_series = session.scalar(select(func.count(Series.id)).where(Series.study_id == study.id))
        assert study.accession_number == ids.accession
        assert study.sending_ae == "MODALITY"
        assert study.state == "receiving" and study.version == 1
        assert set(study.modality.split("\\")) == {"DX", "CR", "SR"}
        assert n_series == 7
        by_uid = {i.sop_instance_uid: i for i in instances}
    assert len(by_uid) == len(files)
    for source in files:
        original = dcmread(source, stop_before_pixels=True)
        row = by_uid[original.SOPInstanceUID]
        spooled = Path(row.path)
        assert spooled.is_file()
        assert spooled.is_relative_to(daemon.settings.spool_dir)
        assert row.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
        assert row.size_bytes == spooled.stat().st_size
        assert dataset_bytes(spooled) == dataset_bytes(source), f"{source.name}: dataset bytes differ"
        meta = dcmread(spooled, stop_before_pixels=True).file_meta
        assert meta.SourceApplicationEntityTitle == "MODALITY"
        assert meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    # nothing left half-written
    assert list((daemon.settings.spool_dir / ".tmp").iterdir()) == []


def test_patient_identifiers_are_not_stored(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = start_daemon()
    ids, files = build_study(tmp_path / "src")
    with caplog.at_level("DEBUG"):
        send_files(daemon.scp.address[1], files)
    database = Path(daemon.settings.database_url.removeprefix("sqlite:///"))
    daemon.stop()
    raw = database.read_bytes() + b"".join(p.read_bytes() for p in database.parent.glob("*.db-wal"))
    assert ids.patient_id.encode() not in raw
    assert b"Doe^Jane" not in raw
    assert ids.patient_id not in caplog.text and "Doe" not in caplog.text


def test_echo_and_calling_ae_allow_list(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = start_daemon(allowed_calling_aets=["MODALITY", "PACS"])
    port = daemon.scp.address[1]
    assert echo_status(port, "MODALITY") == 0
    with caplog.at_level("WARNING"):
        assert echo_status(port, "INTRUDER") is None
    assert "INTRUDER" in caplog.text and "allow-list" in caplog.text
    _, files = build_study(tmp_path / "src")
    with pytest.raises(AssertionError, match="not established"):
        send_files(port, files[:1], calling_ae="INTRUDER")
    assert send_files(port, files[:1], calling_ae="PACS") == [0]


def test_resent_instance_stays_one(start_daemon: Callable[..., RunningDaemon], tmp_path: Path, db_url: str) -> None:
    daemon = start_daemon(db_url=db_url)
    _, files = build_study(tmp_path / "src")
    port = daemon.scp.address[1]
    assert send_files(port, files[:2]) == [0, 0]
    assert send_files(port, files[:2]) == [0, 0]
    assert send_files(port, [files[0], files[0]]) == [0, 0]
    with daemon.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 2


def test_unparsable_dataset_gets_failure_status(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = start_daemon()
    ids = dicomgen.StudyIds()
    ds = dicomgen.image(ids)
    del ds.StudyInstanceUID
    path = dicomgen.save(ds, tmp_path / "nostudy.dcm")
    with caplog.at_level("WARNING"):
        assert send_files(daemon.scp.address[1], [path]) == [0xC210]
    assert "StudyInstanceUID" in caplog.text
    assert list(daemon.settings.spool_dir.rglob("*.dcm")) == []


def test_uids_are_kept_whole_or_refused_never_cut(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Six 71-character SOP Instance UIDs that differ after character 64 were once cut to one and acknowledged.

    pynetdicom's SCU refuses to send such UIDs; DCMTK's storescu (the modality here) sends them as they are.
    """
    daemon = start_daemon()
    ids = dicomgen.StudyIds()
    long_prefix = "1.2.826.0.1.3680043.8.498." + "1" * 38  # 64 characters
    files = []
    for n in range(6):
        ds = dicomgen.image(ids, seed=n)
        ds.SOPInstanceUID = f"{long_prefix}.{n:06d}"  # 71 characters
        files.append(dicomgen.save(ds, tmp_path / f"long{n}.dcm"))
    storescu = ["/usr/bin/storescu", "-v", "--no-halt", "-aet", "MODALITY", "-aec", "FRACWATCH", "127.0.0.1"]
    with caplog.at_level("WARNING"):
        sent = subprocess.run(
            [*storescu, str(daemon.scp.address[1]), *map(str, files)],
            capture_output=True,
            text=True,
            env={**os.environ, "TCP_NODELAY": "1"},
            check=False,
        )
    output = sent.stdout + sent.stderr
    assert output.count("Received Store Response (Error: CannotUnderstand)") == 6, output
    assert "71 characters" in caplog.text
    multi = dicomgen.image(ids, seed=9)
    multi.StudyInstanceUID = [ids.study_uid, "1.2.3.4"]  # a backslash: two values
    with caplog.at_level("WARNING"):
        assert send_files(daemon.scp.address[1], [dicomgen.save(multi, tmp_path / "multi.dcm")]) == [0xC210]
    assert "2 values" in caplog.text
    assert list(daemon.settings.spool_dir.rglob("*.dcm")) == []
    with daemon.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0
    exactly = dicomgen.image(ids, seed=10)
    exactly.SOPInstanceUID = long_prefix  # 64 characters: valid, stored whole
    assert send_files(daemon.scp.address[1], [dicomgen.save(exactly, tmp_path / "64.dcm")]) == [0]
    with daemon.sessions() as session:
        assert session.scalars(select(Instance.sop_instance_uid)).all() == [long_prefix]


def test_unreadable_optional_attribute_is_not_an_error(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SeriesNumber with an unknown VR once escaped header parsing as 0xC211 with a traceback."""
    daemon = start_daemon()
    path = dicomgen.save(dicomgen.image(dicomgen.StudyIds()), tmp_path / "a.dcm")
    raw = path.read_bytes()
    at = raw.index(struct.pack("<HH", 0x0020, 0x0011) + b"IS")
    path.write_bytes(raw[: at + 4] + b"ZZ" + raw[at + 6 :])  # (0020,0011) with the unknown VR "ZZ"
    with caplog.at_level("WARNING"):
        assert send_files(daemon.scp.address[1], [path]) == [0]
    assert "Traceback" not in caplog.text
    with daemon.sessions() as session:
        assert session.scalars(select(Series.series_number)).all() == [None]


def test_completion_after_quiet_period_and_late_instance_reopens(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock, db_url: str
) -> None:
    daemon = start_daemon(db_url=db_url, stable_after=30)
    ids, files = build_study(tmp_path / "src")
    port = daemon.scp.address[1]
    assert send_files(port, files[:3]) == [0, 0, 0]

    def state() -> tuple[str, int]:
        with daemon.sessions() as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == ids.study_uid)).one()
            return study.state, study.version

    clock.advance(10)
    daemon.detect_once()
    assert state() == ("receiving", 1), "complete before the quiet period ended"

    clock.advance(25)
    daemon.detect_once()
    assert daemon.worker.wait_idle(30)
    assert state() == ("scored", 1)

    # a resent copy (PACS re-forwarding the study) does not re-open it, nor does a document
    assert send_files(port, files[:3]) == [0, 0, 0]
    assert send_files(port, files[3:4]) == [0]  # the Basic Text SR
    assert state() == ("scored", 1)

    # a genuinely new image does
    assert send_files(port, files[4:5]) == [0]
    assert state() == ("receiving", 2)
    with daemon.sessions() as session:
        late = session.scalars(select(Instance).where(Instance.study_version == 2)).all()
        assert [i.sop_instance_uid for i in late] == [dcmread(files[4]).SOPInstanceUID]

    clock.advance(31)
    daemon.detect_once()
    assert daemon.worker.wait_idle(30)
    assert state() == ("scored", 2)


def test_restart_requeues_studies_handed_over_but_not_processed(
    make_settings: Callable[..., Settings], tmp_path: Path, clock: FakeClock
) -> None:
    settings = make_settings()
    blocked: list[list[HandOver]] = []
    first = Daemon(settings, processor=blocked.append, clock=clock).start()
    try:
        _, files = build_study(tmp_path / "src")
        assert send_files(first.scp.address[1], files[:1]) == [0]
        clock.advance(60)
        first.detect_once()
        assert first.worker.wait_idle(10)
    finally:
        first.stop()
    assert len(blocked) == 1  # the processor saw it, but did not mark it ready (as if it crashed)

    second = Daemon(settings, clock=clock).start()
    try:
        assert second.worker.wait_idle(10)
        with second.sessions() as session:
            assert session.scalars(select(Study.state)).one() == "scored"
    finally:
        second.stop()


def test_ingest_accepts_every_storage_class_and_reports_explicit_vr(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon()
    ids = dicomgen.StudyIds()
    ds = dicomgen.image(ids, sop_class=dicomgen.DX_PRESENTATION)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    path = dicomgen.save(ds, tmp_path / "sc.dcm", ExplicitVRLittleEndian)
    assert send_files(daemon.scp.address[1], [path]) == [0]


@pytest.mark.timeout(120)
def test_stop_aborts_idle_associations_at_once(start_daemon: Callable[..., RunningDaemon]) -> None:
    """A bare TCP connect (no A-ASSOCIATE-RQ) or an idle association once held a stop for the whole grace
    period; with an hour of ACSE timeout and a clock that never moves, the old stop never returned."""
    daemon = start_daemon(acse_timeout=3600)
    port = daemon.scp.address[1]
    bare = socket.create_connection(("127.0.0.1", port))
    assert echo_status(port) == 0
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    idle = ae.associate("127.0.0.1", port, ae_title="FRACWATCH")  # established, then left idle
    assert idle.is_established
    try:
        daemon.scp.stop(grace=3600, clock=lambda: 0.0)  # returns only once nothing is left in flight
    finally:
        bare.close()
    assert not daemon.scp.running


def test_a_stored_instance_and_an_aborted_association_are_logged_with_a_reason(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = start_daemon()
    port = daemon.scp.address[1]
    ids = dicomgen.StudyIds()
    path = dicomgen.save(dicomgen.image(ids), tmp_path / "one.dcm")
    with caplog.at_level("INFO", logger="fracwatch"):
        assert send_files(port, [path]) == [0]
        ae = AE(ae_title="ABORTER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="FRACWATCH")
        assert assoc.is_established
        assoc.abort()  # an A-ABORT from the calling AE
        ae.acse_timeout = ae.network_timeout = 5
        dropped = ae.associate("127.0.0.1", port, ae_title="FRACWATCH")
        assert dropped.is_established
        dropped.dul.socket.socket.shutdown(socket.SHUT_RDWR)  # the connection dropped with no release
        deadline = time.monotonic() + 10
        while caplog.text.count("aborted:") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    sop = dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert f"stored {sop} (study {ids.study_uid} v1" in caplog.text  # UIDs only, never the patient
    assert "association with ABORTER aborted: the calling AE sent A-ABORT" in caplog.text
    assert "aborted: A-P-ABORT: the connection closed without a release" in caplog.text
