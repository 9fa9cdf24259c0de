"""Overlays for viewers without SR support: heat-map Secondary Captures and a Key Object Selection."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread

from fracwatch.config import load_settings
from fracwatch.daemon import RunningDaemon
from tests.conftest import FakeClock, send_files
from tests.integration.test_scoring import complete, dciodvfy_errors, save, two_image_study
from tests.pacs import running_pacs

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def flag_everything(tmp_path: Path) -> Path:
    """The shipped bundle with operating points at 0: every image is 'positive' (the weights are unchanged)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(load_settings().model_path, bundle)
    card = json.loads((bundle / "model.json").read_text())
    card["operating_points"] = {"doubt": 0.0, "positive": 0.0}
    (bundle / "model.json").write_text(json.dumps(card))
    return bundle


def test_overlays_and_kos_reach_the_pacs_and_validate(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock, flag_everything: Path
) -> None:
    with running_pacs() as pacs:
        daemon = start_daemon(destinations=[pacs.destination], overlays=True, model=flag_everything)
        ids, files = two_image_study(tmp_path / "src")
        before = [f.read_bytes() for f in files]
        send_files(daemon.scp.address[1], files)
        complete(daemon, clock)
        daemon.deliver_once()
        received = pacs.wait_for(4)
    by_modality = {}
    for ds in received:
        by_modality.setdefault(str(ds.Modality), []).append(ds)
    assert sorted((m, len(v)) for m, v in by_modality.items()) == [("KO", 1), ("OT", 2), ("SR", 1)]
    sources = {dcmread(f).SOPInstanceUID: dcmread(f) for f in files}
    for number, sc in enumerate(by_modality["OT"]):
        path = save(sc, tmp_path / f"sc{number}.dcm")
        assert dciodvfy_errors(path) == []
        assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
        assert sc.StudyInstanceUID == ids.study_uid and sc.Manufacturer == "fracwatch"
        source = sources[sc.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert sc.get("Laterality", sc.get("ImageLaterality")) == source.ImageLaterality
        assert sc.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources.values()}
        assert "not for diagnostic use" in sc.SeriesDescription
    (kos,) = by_modality["KO"]
    kos_path = save(kos, tmp_path / "kos.dcm")
    assert dciodvfy_errors(kos_path) == []
    referenced = {
        item.ReferencedSOPInstanceUID
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == set(sources)
    assert hd.ko.KeyObjectSelectionDocument.from_dataset(kos).SOPInstanceUID == kos.SOPInstanceUID
    # the originals are never changed
    assert [f.read_bytes() for f in files] == before


def test_overlays_resent_by_the_pacs_are_not_scored(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock, flag_everything: Path
) -> None:
    with running_pacs() as pacs:
        daemon = start_daemon(destinations=[pacs.destination], overlays=True, model=flag_everything)
        _, files = two_image_study(tmp_path / "src")
        port = daemon.scp.address[1]
        send_files(port, files)
        complete(daemon, clock)
        daemon.deliver_once()
        ours = [save(ds, tmp_path / f"ours{i}.dcm") for i, ds in enumerate(pacs.wait_for(4))]
        assert send_files(port, [*files, *ours]) == [0] * 6
        complete(daemon, clock)
        daemon.deliver_once()
        assert len(pacs.received) == 4
