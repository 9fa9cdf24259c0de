"""`fracwatch predict` on pictures and DICOM, with Grad-CAM overlays; the shipped model separates phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from fracwatch.cli import cli
from fracwatch.synth.phantom import render_phantom, to_stored
from tests import dicomgen
from tests.conftest import PHANTOM_MODEL


def picture(path: Path, fractured: bool, seed: int) -> Path:
    phantom = render_phantom(seed, fractured)
    Image.fromarray((np.clip(phantom.image, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def test_predict_json_and_cam_on_pictures_and_dicom(tmp_path: Path) -> None:
    files = [picture(tmp_path / f"p{seed}.png", seed % 2 == 1, 900 + seed) for seed in range(6)]
    phantom = render_phantom(77, True)
    ds = dicomgen.image(dicomgen.StudyIds(), rows=phantom.image.shape[0], columns=phantom.image.shape[1])
    ds.PixelData = to_stored(phantom.image).tobytes()
    files.append(dicomgen.save(ds, tmp_path / "fractured.dcm"))
    cams = tmp_path / "cams"
    model = str(PHANTOM_MODEL)
    result = CliRunner().invoke(cli, ["predict", "--model", model, "--json", "--cam", str(cams), *map(str, files)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [row["file"] for row in rows] == [str(f) for f in files]
    for row in rows:
        assert row["error"] is None and 0 <= row["probability"] <= 1
        assert row["category"] in ("positive", "doubt", "negative")
        with Image.open(row["cam"]) as cam:
            assert cam.mode == "RGB" and cam.size[0] > 100
    fractured = [row["probability"] for row in rows[1:6:2]] + [rows[-1]["probability"]]
    normal = [row["probability"] for row in rows[0:6:2]]
    assert min(fractured) > max(normal), "the phantom bundle should separate these phantoms"


def test_predict_reports_unreadable_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not an image")
    result = CliRunner().invoke(cli, ["predict", "--json", str(junk), str(tmp_path / "missing.png")])
    assert result.exit_code == 1
    rows = json.loads(result.output)
    assert [row["category"] for row in rows] == ["error", "error"]
    assert all(row["probability"] is None and row["error"] for row in rows)


def test_a_bundle_that_tiles_scores_a_dicom_image_as_its_strongest_tile(tmp_path: Path) -> None:
    """With ``tile_spacing_mm`` in the card, a DICOM image of known spacing is scored as tiles at that spacing
    (its header's Imager Pixel Spacing, 0.15 mm here); the Grad-CAM overlay covers the whole image."""
    import shutil

    import torch

    from fracwatch.model.bundle import load_bundle
    from fracwatch.pipeline.transforms import network_inputs, tile_grid
    from fracwatch.service.scoring import load_file

    model = tmp_path / "tiled"
    shutil.copytree(PHANTOM_MODEL, model)
    card = json.loads((model / "model.json").read_text())
    card["preprocessing"]["tile_spacing_mm"] = 0.15  # the card is not under the weights' checksum
    (model / "model.json").write_text(json.dumps(card))
    phantom = render_phantom(78, True)
    ds = dicomgen.image(dicomgen.StudyIds(), rows=phantom.image.shape[0], columns=phantom.image.shape[1])
    ds.PixelData = to_stored(phantom.image).tobytes()
    path = dicomgen.save(ds, tmp_path / "fractured.dcm")

    bundle = load_bundle(model)
    config = bundle.preprocess_config
    grid = tile_grid(phantom.image.shape, 0.15, config)
    assert grid is not None and len(grid.origins) > 1
    loaded = load_file(path, config)
    assert loaded.frames == 1 and loaded.grid == grid and len(loaded.inputs) == len(grid.origins)

    # on the CPU, in float32 like the reference below (on CUDA predict scores under float16 autocast)
    result = CliRunner().invoke(cli, ["predict", "--model", str(model), "--device", "cpu", "--json",
                                      "--cam", str(tmp_path / "c"), str(path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["frames"] == 1 and row["error"] is None
    with torch.inference_mode():
        tiles = torch.stack(network_inputs(loaded.display, config, grid))
        strongest = float(torch.sigmoid(bundle.network(tiles)).max())
    assert abs(row["probability"] - strongest) < 1e-5
    with Image.open(row["cam"]) as cam:
        assert cam.size[0] == phantom.image.shape[1]  # the overlay is drawn on the whole image, caption below

    # a picture of the same pixels: one whole-image input, unless --pixel-spacing says how fine it is
    png = picture(tmp_path / "same.png", True, 78)
    plain, spaced = (
        json.loads(CliRunner().invoke(cli, ["predict", "--model", str(model), "--json", *extra, str(png)]).output)[0]
        for extra in ([], ["--pixel-spacing", "0.15"])
    )
    assert plain["frames"] == spaced["frames"] == 1 and plain["probability"] != spaced["probability"]
    assert abs(spaced["probability"] - row["probability"]) < 0.05  # 8-bit picture against 16-bit DICOM

    # with the tile-count correction in the card, the strongest tile's odds are divided by the tile count
    card["preprocessing"]["tile_count_correction"] = True
    (model / "model.json").write_text(json.dumps(card))
    corrected = CliRunner().invoke(cli, ["predict", "--model", str(model), "--device", "cpu", "--json", str(path)])
    assert corrected.exit_code == 0, corrected.output
    n = len(grid.origins)
    assert abs(json.loads(corrected.output)[0]["probability"] - strongest / (strongest + n * (1 - strongest))) < 1e-5
