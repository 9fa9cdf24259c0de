"""End to end through a real ``fracwatch serve`` process: DX study in, SR out to a PACS, results via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.uid import generate_uid

from fracwatch.cli import cli
from tests import dicomgen
from tests.conftest import free_port, send_files
from tests.pacs import running_pacs
from tests.serveproc import ServeProcess, serve_args

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def test_serve_scores_a_study_and_the_cli_reports_it(tmp_path: Path) -> None:
    ids = dicomgen.StudyIds(accession="E2E-1")
    series = str(generate_uid())
    files = [
        dicomgen.save(dicomgen.image(ids, series_uid=series, seed=s, rows=400, columns=320), tmp_path / f"{s}.dcm")
        for s in (1, 2)
    ]
    data_dir = tmp_path / "data"
    port = free_port()
    with running_pacs() as pacs:
        server = ServeProcess(
            serve_args(data_dir, port, "--stable-after", "1", "--destination", pacs.destination),
            env={"FRACWATCH_COMPLETION_INTERVAL": "0.2"},
        )
        try:
            server.wait_for("listening as")
            assert send_files(port, files) == [0, 0]
            (sr,) = pacs.wait_for(1, timeout=120)
            server.wait_for("acknowledged by")
        finally:
            assert server.terminate() == 0, server.output
    assert "Doe" not in server.output and ids.patient_id not in server.output  # no PHI in logs
    assert " highdicom" not in server.output  # its seven INFO lines per SR stay out of the log
    for path in files:  # each C-STORE is logged, by UID
        assert f"stored {dcmread(path, stop_before_pixels=True).SOPInstanceUID} (study {ids.study_uid}" in server.output

    sr_path = tmp_path / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    document = hd.sr.srread(sr_path)
    sources = {dcmread(f).SOPInstanceUID for f in files}
    referenced = {
        image.referenced_sop_instance_uid
        for group in document.content.get_image_measurement_groups()
        for image in group.source_images
    }
    assert referenced == sources

    runner = CliRunner()
    result = runner.invoke(cli, ["results", "--data-dir", str(data_dir), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["study_instance_uid"] == ids.study_uid
    assert row["category"] in ("positive", "doubt", "negative")
    assert isinstance(row["probability"], float) and 0 <= row["probability"] <= 1
    assert row["model_version"] and row["sr_sop_instance_uid"] == sr.SOPInstanceUID
    assert row["delivered_at"] is not None and row["turnaround_seconds"] >= 0

    outbox = runner.invoke(cli, ["outbox", "--data-dir", str(data_dir), "--json"])
    assert outbox.exit_code == 0 and json.loads(outbox.output) == []  # nothing pending or dead
    sent = json.loads(runner.invoke(cli, ["outbox", "--data-dir", str(data_dir), "--json", "--all"]).output)
    assert [(d["state"], d["destination"]) for d in sent] == [("sent", pacs.destination)]

    again = runner.invoke(cli, ["resend", ids.study_uid, "--data-dir", str(data_dir)])
    assert again.exit_code == 0 and "queued 0 deliveries" in again.output and "1 destinations already" in again.output
    missing = runner.invoke(cli, ["resend", "1.2.3.4", "--data-dir", str(data_dir)])
    assert missing.exit_code == 1 and "no fracwatch report" in missing.output

    studies = json.loads(runner.invoke(cli, ["studies", "--data-dir", str(data_dir), "--json"]).output)
    assert [(s["study_instance_uid"], s["state"], s["instances"]) for s in studies] == [(ids.study_uid, "scored", 2)]
