"""Score and report: a daemon scores complete studies, writes a TID 1500 SR and delivers it to a PACS."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from fracwatch.daemon import Daemon, RunningDaemon
from fracwatch.model.bundle import load_bundle
from fracwatch.store import results
from fracwatch.store.models import Delivery, ImageResult, Instance, Study, StudyResult
from tests import dicomgen
from tests.conftest import FakeClock, send_files
from tests.pacs import FakePacs, running_pacs

pytestmark = pytest.mark.timeout(180)


def dciodvfy_errors(path: Path, kinds: tuple[str, ...] = ("Error",)) -> list[str]:
    """Error lines (or the ``kinds`` asked for, such as Warning) dicom3tools' dciodvfy reports on ``path`` (the
    test fails if the tool is missing)."""
    tool = shutil.which("dciodvfy")
    assert tool, "dciodvfy not found: install the Debian package dicom3tools"
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(kinds)]


def two_image_study(directory: Path) -> tuple[dicomgen.StudyIds, list[Path]]:
    ids = dicomgen.StudyIds()
    series = str(generate_uid())
    files = [
        dicomgen.save(
            dicomgen.image(ids, series_uid=series, seed=seed, rows=300, columns=240), directory / f"{seed}.dcm"
        )
        for seed in (11, 12)
    ]
    return ids, files


def text_items(item: Dataset, code_value: str) -> list[str]:
    """Text values of the content items named ``code_value`` directly under ``item``."""
    return [
        child.TextValue
        for child in item.ContentSequence
        if child.ConceptNameCodeSequence[0].CodeValue == code_value and "TextValue" in child
    ]


def complete(daemon: Daemon, clock: FakeClock) -> None:
    clock.advance(daemon.settings.stable_after + 1)
    daemon.detect_once()
    assert daemon.worker.wait_idle(60)


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_two_image_study_gets_an_sr_at_the_pacs(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock, db_url: str
) -> None:
    with running_pacs() as pacs:
        daemon = start_daemon(db_url=db_url, destinations=[pacs.destination])
        ids, files = two_image_study(tmp_path / "src")
        assert send_files(daemon.scp.address[1], files) == [0, 0]
        complete(daemon, clock)
        daemon.deliver_once()
        (received,) = pacs.wait_for(1)

    sr_path = save(received, tmp_path / "sr.dcm")
    assert dciodvfy_errors(sr_path, ("Error", "Warning")) == []  # 0 errors and 0 warnings
    sr = hd.sr.srread(sr_path)
    card = load_bundle(daemon.settings.model_path).card
    assert sr.StudyInstanceUID == ids.study_uid
    assert sr.PatientID == ids.patient_id  # patient module copied from the source
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.SeriesInstanceUID not in {dcmread(f).SeriesInstanceUID for f in files}
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    sources = {dcmread(f).SOPInstanceUID for f in files}
    assert evidence == sources
    (ours,) = [item for item in sr.ContributingEquipmentSequence if item.Manufacturer == "fracwatch"]
    assert "DeviceUID" not in ours  # not in the equipment macro (dciodvfy); the observer context carries it
    assert ours.ManufacturerModelName == card.name
    assert ours.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment

    report = sr.content
    groups = report.get_image_measurement_groups()
    assert len(groups) == 3  # one per image + the study-level group
    with daemon.sessions() as session:
        stored = {uid: p for uid, p, _, _ in results.image_results(session, ids.study_uid)}
        result = session.scalars(select(StudyResult)).one()
    per_image = {}
    for group in groups:
        assert group.finding_type.value == "125605004"
        assert text_items(group[0], "111001") == [card.name]  # Algorithm Name (TID 4019)
        assert text_items(group[0], "111003") == [card.version]  # Algorithm Version
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.value.value in ("52101004", "2667000", "82334004")
        (measurement,) = group.get_measurements()
        assert measurement.unit.value == "1"
        refs = [image.referenced_sop_instance_uid for image in group.source_images]
        if len(refs) == 1:
            per_image[refs[0]] = measurement.value
        else:
            assert set(refs) == sources
            assert float(measurement.value) == pytest.approx(result.probability, abs=1e-6)
    assert set(per_image) == sources
    for uid, value in per_image.items():
        assert float(value) == pytest.approx(stored[uid], abs=1e-6)
    observer = report.get_observer_contexts()[0]
    assert observer.observer_identifying_attributes.uid == card.device_uid
    assert result.category in ("positive", "doubt", "negative")
    assert result.delivered_at is not None and result.scored_at is not None and result.completed_at is not None


def test_pacs_reforwarding_the_study_with_our_sr_causes_no_second_sr(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock
) -> None:
    with running_pacs() as pacs:
        daemon = start_daemon(destinations=[pacs.destination])
        _, files = two_image_study(tmp_path / "src")
        port = daemon.scp.address[1]
        send_files(port, files)
        complete(daemon, clock)
        daemon.deliver_once()
        (sr,) = pacs.wait_for(1)
        # a naive routing rule forwards the whole study again: images and our SR
        assert send_files(port, [*files, save(sr, tmp_path / "ours.dcm")]) == [0, 0, 0]
        complete(daemon, clock)
        daemon.deliver_once()
        assert len(pacs.received) == 1
    with daemon.sessions() as session:
        study = session.scalars(select(Study)).one()
        assert (study.state, study.version) == ("scored", 1)
        assert len(session.scalars(select(StudyResult)).all()) == 1


def test_late_image_rescoring_supersedes_the_earlier_sr(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock
) -> None:
    with running_pacs() as pacs:
        daemon = start_daemon(destinations=[pacs.destination])
        _, files = two_image_study(tmp_path / "src")
        port = daemon.scp.address[1]
        send_files(port, files[:1])
        complete(daemon, clock)
        daemon.deliver_once()
        send_files(port, files[1:])
        complete(daemon, clock)
        daemon.deliver_once()
        first, second = pacs.wait_for(2)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    (predecessor,) = second.PredecessorDocumentsSequence
    assert (
        predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == first.SOPInstanceUID
    )
    with daemon.sessions() as session:
        versions = [r.study_version for r in session.scalars(select(StudyResult).order_by(StudyResult.id))]
        assert versions == [1, 2]


def test_destination_down_then_up_delivers_exactly_once(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock
) -> None:
    pacs = FakePacs()
    daemon = start_daemon(destinations=[pacs.destination], retry_base=30, send_timeout=3)
    _, files = two_image_study(tmp_path / "src")
    send_files(daemon.scp.address[1], files)
    complete(daemon, clock)
    daemon.deliver_once()  # PACS down: connection refused
    with daemon.sessions() as session:
        delivery = session.scalars(select(Delivery)).one()
        assert (delivery.state, delivery.attempts) == ("pending", 1)
        assert delivery.next_attempt_at is not None
    pacs.start()
    try:
        daemon.deliver_once()  # not due yet: back-off
        assert pacs.received == []
        clock.advance(31)
        daemon.deliver_once()
        pacs.wait_for(1)
        clock.advance(3600)
        daemon.deliver_once()
        daemon.deliver_once()
        assert len(pacs.received) == 1
    finally:
        pacs.stop()
    with daemon.sessions() as session:
        delivery = session.scalars(select(Delivery)).one()
        assert (delivery.state, delivery.attempts, delivery.last_status) == ("sent", 2, 0)


def test_permanent_rejection_goes_to_dead_letter(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock
) -> None:
    with running_pacs(status=0xA900) as pacs:
        daemon = start_daemon(destinations=[pacs.destination])
        _, files = two_image_study(tmp_path / "src")
        send_files(daemon.scp.address[1], files)
        complete(daemon, clock)
        daemon.deliver_once()
        clock.advance(7200)
        daemon.deliver_once()
    with daemon.sessions() as session:
        delivery = session.scalars(select(Delivery)).one()
        assert (delivery.state, delivery.attempts, delivery.last_status) == ("dead", 1, 0xA900)


def test_corrupt_pixels_are_an_error_row_and_sr_documents_are_never_scored(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock
) -> None:
    with running_pacs() as pacs:
        daemon = start_daemon(destinations=[pacs.destination])
        ids, files = two_image_study(tmp_path / "src")
        broken = dicomgen.image(ids, series_number=5, rows=300, columns=240)
        broken.PixelData = broken.PixelData[:1000]  # truncated pixel data
        broken_path = dicomgen.save(broken, tmp_path / "broken.dcm")
        sr_path = dicomgen.save(dicomgen.basic_text_sr(ids), tmp_path / "sr.dcm")
        assert send_files(daemon.scp.address[1], [*files, broken_path, sr_path]) == [0, 0, 0, 0]
        complete(daemon, clock)
        daemon.deliver_once()
        (sr,) = pacs.wait_for(1)
    with daemon.sessions() as session:
        result = session.scalars(select(StudyResult)).one()
        rows = session.execute(
            select(Instance.sop_instance_uid, ImageResult.probability, ImageResult.error).join(Instance)
        ).all()
    by_uid = {uid: (p, error) for uid, p, error in rows}
    assert (result.images_scored, result.images_failed) == (2, 1)
    assert by_uid[broken.SOPInstanceUID][0] is None and by_uid[broken.SOPInstanceUID][1]
    assert dcmread(sr_path).SOPInstanceUID not in by_uid  # the SR document was not scored
    groups = hd.sr.srread(save(sr, tmp_path / "out.dcm")).content.get_image_measurement_groups()
    assert len(groups) == 3


def test_study_of_documents_only_is_skipped(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock
) -> None:
    daemon = start_daemon()
    ids = dicomgen.StudyIds()
    send_files(daemon.scp.address[1], [dicomgen.save(dicomgen.basic_text_sr(ids), tmp_path / "sr.dcm")])
    complete(daemon, clock)
    with daemon.sessions() as session:
        assert session.scalars(select(Study.state)).one() == "skipped"
        assert session.scalars(select(StudyResult)).all() == []


def _pattern_dx(ids: dicomgen.StudyIds, series: str) -> Dataset:
    """A DX whose pixels are SMPTE bars: a test pattern a modality or a PACS can send as an image."""
    from tests import patterns

    ds = dicomgen.image(ids, series_uid=series, rows=480, columns=640)
    ds.PixelData = (patterns.smpte_bars() * 16).astype("uint16").tobytes()
    return ds


def test_out_of_scope_images_are_skipped_with_a_reason_and_get_no_sr_or_flag(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock
) -> None:
    from fracwatch.store import search

    with running_pacs() as pacs:
        daemon = start_daemon(destinations=[pacs.destination])
        only = dicomgen.StudyIds(accession="PATTERN")
        mixed = dicomgen.StudyIds(accession="MIXED")
        series = str(generate_uid())
        files = [
            dicomgen.save(_pattern_dx(only, str(generate_uid())), tmp_path / "only.dcm"),
            dicomgen.save(_pattern_dx(mixed, series), tmp_path / "mixed-pattern.dcm"),
            dicomgen.save(dicomgen.phantom_image(mixed, 7, True, series), tmp_path / "mixed-phantom.dcm"),
        ]
        assert send_files(daemon.scp.address[1], files) == [0, 0, 0]
        complete(daemon, clock)
        (sr,) = pacs.wait_for(1, timeout=60)
        assert sr.StudyInstanceUID == mixed.study_uid  # the pattern-only study sends nothing to PACS
        daemon.deliver_once()
        assert len(pacs.received) == 1
        with daemon.sessions() as session:
            pattern_only = search.study_detail(session, only.study_uid)
            both = search.study_detail(session, mixed.study_uid)
            flagged = session.scalar(select(Study.flagged_at).where(Study.study_instance_uid == only.study_uid))
    assert pattern_only is not None and both is not None and flagged is None
    (result,) = pattern_only.results
    assert result.category == "skipped" and result.probability is None and result.sr_sop_instance_uid is None
    (image,) = result.images
    assert image.category == "skipped" and image.error is None and "test pattern" in (image.reason or "")
    (scored,) = both.results
    by_category = {i.category: i for i in scored.images}
    assert set(by_category) - {"skipped"} and "skipped" in by_category  # one scored, one skipped
    assert scored.sr_sop_instance_uid == sr.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    pattern_uid = by_category["skipped"].sop_instance_uid
    assert {str(item.ReferencedSOPInstanceUID) for item in evidence} == {i.sop_instance_uid for i in scored.images}
    groups = _measurement_groups(sr)
    (not_assessed,) = [g for g in groups if "not assessed" in g["tracking"]]
    assert not_assessed["Fracture of bone"] == "Not done" and "Probability" not in not_assessed
    assert not_assessed["sources"] == {pattern_uid}
    study = next(g for g in groups if g["tracking"].startswith("Study"))
    assert pattern_uid not in study["sources"] and study["Probability"]  # the study's result: scored images only
    sr_path = tmp_path / "mixed-sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    assert dciodvfy_errors(sr_path, ("Error", "Warning")) == []  # the not-assessed group is valid TID 1501


def _measurement_groups(sr: Dataset) -> list[dict[str, Any]]:
    """Each TID 1501 group of an SR: its tracking identifier, qualitative values and measurements by concept
    name, and the SOP Instance UIDs of its source images."""
    groups = []

    def walk(items: Any) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if name == "Measurement Group":
                group: dict[str, Any] = {"tracking": "", "sources": set()}
                for child in item.ContentSequence:
                    meaning = child.ConceptNameCodeSequence[0].CodeMeaning
                    if child.ValueType == "TEXT" and meaning == "Tracking Identifier":
                        group["tracking"] = str(child.TextValue)
                    elif child.ValueType == "CODE":
                        group[meaning] = child.ConceptCodeSequence[0].CodeMeaning
                    elif child.ValueType == "NUM":
                        group[meaning] = float(child.MeasuredValueSequence[0].NumericValue)
                    elif child.ValueType == "IMAGE":
                        group["sources"].add(str(child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
                groups.append(group)
            elif "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return groups


def test_the_start_up_rehearsal_runs_the_whole_path_and_keeps_nothing(tmp_path: Path) -> None:
    """A scoring process rehearses on a made-up whole chest when it starts: decoded as tiles, scored, an SR
    built; no file is written and nothing touches the database (its session factory is bound to nothing)."""
    from sqlalchemy.orm import sessionmaker

    from fracwatch.config import load_settings
    from fracwatch.dicom.spool import Spool
    from fracwatch.model.bundle import load_bundle
    from fracwatch.model.predictor import Predictor
    from fracwatch.service.scoring import StudyScorer, load_dicom, rehearsal_dataset

    bundle = load_bundle(load_settings().model_path)
    image = load_dicom(rehearsal_dataset(), bundle.preprocess_config, bundle.scope)
    assert image.error is None and image.skipped is None and len(image.inputs) > 1  # a whole chest: tiles
    reports = Spool(tmp_path / "results")
    reports.prepare()
    scorer = StudyScorer(sessionmaker(), bundle, Predictor(bundle.network, "cpu"), reports, [])
    scorer.rehearse()
    assert not any(path.is_file() for path in (tmp_path / "results").rglob("*"))
