"""DCMTK as the modality: echoscu, and storescu with compressed transfer syntaxes made here from real
computed radiographs (NEMA WG04 via pydicom-data) with dcmcjpls, dcmcrle and dcmcjpeg."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy import select

from fracwatch.daemon import RunningDaemon
from fracwatch.store.models import Instance, StudyResult
from tests.conftest import FakeClock

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def dcmtk(tool: str) -> str:
    path = Path("/usr/bin") / tool  # DCMTK's, not a same-named pip console script earlier on PATH
    found = str(path) if path.exists() else shutil.which(tool)
    assert found, f"{tool} not found: install the Debian package dcmtk"
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, check=False, env={**os.environ, "TCP_NODELAY": "1"}
    )


def transcode(tool: str, option: str, source: Path, target: Path) -> Path:
    result = run(dcmtk(tool), option, str(source), str(target))
    assert result.returncode == 0, result.stderr
    # the transcode keeps the SOP Instance UID; give it its own before storing it beside the original
    result = run(dcmtk("dcmodify"), "-nb", "-gin", str(target))
    assert result.returncode == 0, result.stderr
    return target


def test_echoscu(start_daemon: Callable[..., RunningDaemon]) -> None:
    daemon = start_daemon()
    result = run(dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "FRACWATCH", "127.0.0.1", str(daemon.scp.address[1]))
    assert result.returncode == 0, result.stderr


def test_storescu_compressed_radiographs_are_stored_as_sent_and_scored(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock
) -> None:
    rg3 = Path(str(get_testdata_file("RG3_UNCR.dcm")))
    files = {
        JPEGLSLossless: transcode("dcmcjpls", "+el", rg3, tmp_path / "rg3_jls.dcm"),
        RLELossless: transcode("dcmcrle", "+ot", rg3, tmp_path / "rg3_rle.dcm"),
        JPEGLosslessSV1: transcode("dcmcjpeg", "+e1", rg3, tmp_path / "rg3_jpegll.dcm"),
        JPEG2000Lossless: Path(str(get_testdata_file("RG1_J2KR.dcm"))),
        JPEG2000: Path(str(get_testdata_file("RG3_J2KI.dcm"))),
    }
    for syntax, path in files.items():
        assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax, path.name
    daemon = start_daemon()
    port = str(daemon.scp.address[1])
    # storescu proposes one compressed syntax per run (-xt JPEG-LS, -xr RLE, -xs JPEG lossless, -xv/-xw J2K):
    # a modality configured to send compressed, as is
    propose = {
        JPEGLSLossless: "-xt",
        RLELossless: "-xr",
        JPEGLosslessSV1: "-xs",
        JPEG2000Lossless: "-xv",
        JPEG2000: "-xw",
    }
    for syntax, path in files.items():
        storescu = [dcmtk("storescu"), propose[syntax], "-aet", "MODALITY", "-aec", "FRACWATCH", "127.0.0.1", port]
        result = run(*storescu, str(path))
        assert result.returncode == 0, result.stderr
    with daemon.sessions() as session:
        stored = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
    for syntax, path in files.items():
        row = stored[dcmread(path, stop_before_pixels=True).SOPInstanceUID]
        assert row.transfer_syntax_uid == syntax  # accepted as sent, not transcoded
        assert dcmread(row.path).PixelData == dcmread(path).PixelData
    clock.advance(60)
    daemon.detect_once()
    assert daemon.worker.wait_idle(120)
    with daemon.sessions() as session:
        results = session.scalars(select(StudyResult)).all()
    assert sum(r.images_scored for r in results) == len(files)
    assert sum(r.images_failed for r in results) == 0
