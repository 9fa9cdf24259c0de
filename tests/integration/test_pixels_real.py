"""Real computed radiographs (NEMA WG04 via pydicom-data) and transcodes of them all score without error."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

from fracwatch.cli import cli

pytestmark = pytest.mark.timeout(300)

WG04 = ["RG1_UNCR.dcm", "RG3_UNCR.dcm", "RG1_J2KR.dcm", "RG3_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KI.dcm"]


def wg04(name: str) -> Path:
    path = get_testdata_file(name)
    assert path, f"{name} missing: install the pydicom-data package"
    return Path(str(path))


def transcode_with_pydicom(source: Path, target: Path, syntax: str) -> Path:
    ds = dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.compress(syntax, generate_instance_uid=False)
    ds.save_as(target, enforce_file_format=True)
    return target


def transcode_jpeg_lossless(source: Path, target: Path) -> Path:
    tool = shutil.which("dcmcjpeg")
    assert tool, "dcmcjpeg not found: install the Debian package dcmtk"
    subprocess.run([tool, "+e1", str(source), str(target)], check=True, capture_output=True)
    return target


def predict_json(*paths: Path) -> list[dict[str, object]]:
    result = CliRunner().invoke(cli, ["predict", "--json", *map(str, paths)])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def test_wg04_radiographs_score(tmp_path: Path) -> None:
    rows = predict_json(*(wg04(name) for name in WG04))
    for row in rows:
        assert row["error"] is None, row
        assert 0.0 <= float(row["probability"]) <= 1.0  # type: ignore[arg-type]
        assert row["category"] in ("positive", "doubt", "negative")
    by_name = {Path(str(r["file"])).name: float(r["probability"]) for r in rows}  # type: ignore[arg-type]
    # lossless J2K decodes to the same pixels as the uncompressed original
    assert by_name["RG1_J2KR.dcm"] == pytest.approx(by_name["RG1_UNCR.dcm"], abs=1e-6)
    assert by_name["RG3_J2KR.dcm"] == pytest.approx(by_name["RG3_UNCR.dcm"], abs=1e-6)


def test_lossless_transcodes_score_like_the_original(tmp_path: Path) -> None:
    source = wg04("RG3_UNCR.dcm")
    files = [
        transcode_with_pydicom(source, tmp_path / "jls.dcm", JPEGLSLossless),
        transcode_with_pydicom(source, tmp_path / "rle.dcm", RLELossless),
        transcode_jpeg_lossless(source, tmp_path / "jpegll.dcm"),
    ]
    rows = predict_json(source, *files)
    reference = float(rows[0]["probability"])  # type: ignore[arg-type]
    for row in rows[1:]:
        assert row["error"] is None, row
        assert float(row["probability"]) == pytest.approx(reference, abs=1e-6)  # type: ignore[arg-type]
