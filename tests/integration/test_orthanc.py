"""Round trip with a real PACS: DCMTK storescu → Orthanc → (Lua OnStableStudy) → fracwatch → SR (and overlays)
back into the same study on Orthanc; Orthanc's naive rule re-forwards the study, our SR included, and
fracwatch must not answer with a second SR."""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom import dcmread

from fracwatch.cli import cli
from tests.conftest import free_port
from tests.integration.test_scoring import dciodvfy_errors, two_image_study
from tests.orthanc import Orthanc
from tests.serveproc import ServeProcess, serve_args

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

LUA = Path(__file__).resolve().parents[2] / "deploy" / "orthanc" / "forward-to-fracwatch.lua"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)  # polling another process's state (Orthanc's REST API, our database)


def storescu(port: int, files: list[Path]) -> None:
    tool = shutil.which("storescu")
    tool = "/usr/bin/storescu" if Path("/usr/bin/storescu").exists() else tool  # DCMTK's, not a pip shim
    assert tool, "storescu not found: install the Debian package dcmtk"
    subprocess.run(
        [tool, "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1", str(port), *map(str, files)],
        check=True,
        capture_output=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def test_orthanc_round_trip_without_a_second_sr(tmp_path: Path) -> None:
    fracwatch_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", {"fracwatch": ["FRACWATCH", "127.0.0.1", fracwatch_port]}, [LUA])
    data_dir = tmp_path / "fracwatch"
    server = ServeProcess(
        serve_args(
            data_dir, fracwatch_port, "--stable-after", "1", "--destination", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
        ),
        env={"FRACWATCH_COMPLETION_INTERVAL": "0.2", "FRACWATCH_OVERLAYS": "true"},
    )
    try:
        server.wait_for("listening as")
        ids, files = two_image_study(tmp_path / "src")
        storescu(orthanc.dicom_port, files)

        def series_by_modality() -> dict[str, list[str]]:
            study = orthanc.study_id(ids.study_uid)
            out: dict[str, list[str]] = {}
            for series in orthanc.get(f"/studies/{study}/series") if study else []:
                out.setdefault(series["MainDicomTags"]["Modality"], []).extend(series["Instances"])
            return out

        wait_until(lambda: "SR" in series_by_modality(), 120, "fracwatch's SR in Orthanc")
        # Orthanc re-forwards the whole study once it is stable again: wait until fracwatch holds our SR
        sr_instance = series_by_modality()["SR"][0]
        sr_uid = orthanc.get(f"/instances/{sr_instance}/simplified-tags")["SOPInstanceUID"]

        # the re-forward brings the 2 images (already held) and our own objects, new to the database
        def holds_our_sr() -> bool:
            with sqlite3.connect(data_dir / "fracwatch.db") as conn:
                found = conn.execute("select 1 from instances where sop_instance_uid = ?", (sr_uid,)).fetchone()
            return found is not None

        wait_until(holds_our_sr, 120, "Orthanc's re-forward of fracwatch's SR to fracwatch")
        # a re-open happens as the re-forwarded objects are recorded: the study must still be at version 1
        # with its one result, so no second scoring (and no second SR) can follow
        studies = json.loads(CliRunner().invoke(cli, ["studies", "--data-dir", str(data_dir), "--json"]).output)
        assert [(s["state"], s["version"]) for s in studies] == [("scored", 1)]
        results = json.loads(CliRunner().invoke(cli, ["results", "--data-dir", str(data_dir), "--json"]).output)
        assert len(results) == 1
        modalities = series_by_modality()
        sr_bytes = orthanc.get(f"/instances/{modalities['SR'][0]}/file")
    finally:
        assert server.terminate() == 0, server.output
        orthanc.stop()

    assert len(modalities["SR"]) == 1, "fracwatch answered its own SR with a second SR"
    assert len(modalities["OT"]) == 2  # one heat-map overlay per image
    assert len(modalities["DX"]) == 2  # the originals, untouched
    sr = dcmread(io.BytesIO(sr_bytes))
    assert sr.SOPInstanceUID == sr_uid
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {dcmread(f).SOPInstanceUID for f in files}
    sr_path = tmp_path / "from-orthanc-sr.dcm"
    sr_path.write_bytes(sr_bytes)
    assert dciodvfy_errors(sr_path) == []
