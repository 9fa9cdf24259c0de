"""Hostile uploads and images: a pixel budget read from the header, before anything is decoded.

A 30000 x 30000 PNG of a few hundred bytes once reached Pillow (a 500), a 6000 x 6000 one took the daemon to
3.35 GB, and a DICOM header claiming 65535 x 65535 drove the decoder to 8.6 GB.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
from click.testing import CliRunner

from fracwatch.cli import cli
from fracwatch.daemon import RunningDaemon
from fracwatch.pipeline.pictures import MAX_PIXELS
from fracwatch.service.queries import create_token
from tests import dicomgen, patterns
from tests.conftest import PHANTOM_MODEL
from tests.integration.test_predict import picture


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` grey pixels, with almost no image data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_predict_refuses_images_over_the_pixel_budget_from_their_header(tmp_path: Path) -> None:
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)  # past Pillow's own limit
    large = png_header_only(tmp_path / "large.png", 6000, 6000)  # under Pillow's, over ours
    ds = dicomgen.image(dicomgen.StudyIds())
    ds.Rows = ds.Columns = 65535  # the pixel data behind it is tiny: only the header is checked
    huge = dicomgen.save(ds, tmp_path / "huge.dcm")
    fine = picture(tmp_path / "fine.png", fractured=True, seed=3)
    result = CliRunner().invoke(
        cli, ["predict", "--model", str(PHANTOM_MODEL), "--json", *map(str, (bomb, large, huge, fine))]
    )
    assert result.exit_code == 1
    rows = {Path(r["file"]).name: r for r in json.loads(result.output)}
    for name in ("bomb.png", "large.png", "huge.dcm"):
        assert rows[name]["category"] == "error" and "budget" in rows[name]["error"], rows[name]
    assert rows["fine.png"]["error"] is None and rows["fine.png"]["probability"] is not None
    assert 6000 * 6000 > MAX_PIXELS


def test_upload_over_the_budget_is_a_422_and_the_server_stays_up(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon()
    token = create_token(daemon.settings, "uploader", "viewer")
    base = f"http://127.0.0.1:{daemon.settings.http_port}"
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000).read_bytes()
        answer = client.post("/api/predict", files={"file": ("bomb.png", bomb, "image/png")})
        assert answer.status_code == 422 and "budget" in answer.json()["detail"]
        fine = picture(tmp_path / "fine.png", fractured=True, seed=3).read_bytes()
        scored = client.post("/api/predict", files={"file": ("fine.png", fine, "image/png")})
        assert scored.status_code == 200 and scored.json()["category"] in ("positive", "doubt", "negative")
        assert client.get("/healthz").status_code == 200


def test_out_of_scope_images_are_skipped_with_a_reason_by_predict_and_the_upload_api(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    """A SMPTE test pattern once came out "doubt, fracture possible (p = 0.41)" on the upload page."""
    smpte = patterns.save_png(patterns.smpte_bars(), tmp_path / "smpte.png")
    page = patterns.save_png(patterns.document(), tmp_path / "page.png")
    photo = patterns.colour_photo(tmp_path / "photo.png")
    fine = picture(tmp_path / "fine.png", fractured=True, seed=3)
    files = [str(path) for path in (smpte, page, photo, fine)]
    result = CliRunner().invoke(cli, ["predict", "--model", str(PHANTOM_MODEL), "--json", *files])
    assert result.exit_code == 0, result.output  # skipping is not an error
    rows = {Path(row["file"]).name: row for row in json.loads(result.output)}
    for name in ("smpte.png", "page.png", "photo.png"):
        assert rows[name]["category"] == "skipped" and rows[name]["probability"] is None
        assert rows[name]["reason"].startswith("not a radiograph") and rows[name]["error"] is None
    assert rows["fine.png"]["category"] in ("positive", "doubt", "negative") and rows["fine.png"]["reason"] is None

    daemon = start_daemon()
    token = create_token(daemon.settings, "uploader", "viewer")
    base = f"http://127.0.0.1:{daemon.settings.http_port}"
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        answer = client.post("/api/predict", files={"file": ("smpte.png", smpte.read_bytes(), "image/png")})
        assert answer.status_code == 200, answer.text
        assert answer.json()["category"] == "skipped" and answer.json()["probability"] is None
        assert "test pattern" in answer.json()["reason"] and answer.json()["cam_png"] is None
