"""Tiles at a pixel spacing: a whole chest is scored at the millimetres per input pixel detail views have."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset

from fracwatch.pipeline.transforms import (
    PreprocessConfig,
    decode_target,
    network_inputs,
    preprocess_tiles,
    stitch_tiles,
    tile_count_corrected,
    tile_grid,
)

TILED = PreprocessConfig(input_size=256, tile_spacing_mm=0.63)


def test_no_tiles_without_a_spacing_or_when_the_whole_image_is_fine_enough() -> None:
    assert tile_grid((512, 400), None, TILED) is None  # a picture of unknown spacing
    assert tile_grid((512, 400), 0.8, PreprocessConfig()) is None  # the bundle does not tile
    assert tile_grid((512, 400), 0.3, TILED) is None  # 154 mm over 256 px: 0.6 mm ≤ 0.63
    assert tile_grid((512, 400), 0.0, TILED) is None


@pytest.mark.parametrize(("shape", "spacing"), [((512, 410), 0.8), ((600, 100), 1.0), ((2000, 1600), 0.15)])
def test_tiles_cover_the_canvas_at_most_max_tiles_at_the_finest_spacing_allowed(
    shape: tuple[int, int], spacing: float
) -> None:
    grid = tile_grid(shape, spacing, TILED)
    assert grid is not None and 1 < len(grid.origins) <= TILED.max_tiles
    rows, cols = grid.canvas
    assert abs(rows / cols - shape[0] / shape[1]) < 0.02  # aspect kept
    covered = np.zeros(grid.canvas, dtype=bool)
    for top, left in grid.origins:
        assert 0 <= top and 0 <= left and (top + 256 <= rows or top == 0) and (left + 256 <= cols or left == 0)
        covered[top : top + 256, left : left + 256] = True
    assert covered.all()
    # the finest grid within max_tiles: 0.63 mm where nine tiles cover the image at it (a whole chest of 410 mm
    # at 0.63 mm would need twelve, so it is coarsened a little)
    finest = tile_grid(shape, spacing, dataclasses.replace(TILED, max_tiles=1000))
    assert finest is not None and max(shape) * spacing / max(finest.canvas) <= 0.63 + 1e-6
    assert grid == finest or len(finest.origins) > TILED.max_tiles
    # neighbours overlap by at least a quarter tile, so a break near an edge lies whole inside one of them
    tops = sorted({top for top, _ in grid.origins})
    assert all(b - a <= 256 * 0.75 + 1 for a, b in itertools.pairwise(tops))


def test_a_large_detector_image_is_coarsened_to_max_tiles() -> None:
    grid = tile_grid((3000, 2500), 0.15, TILED)  # 450 mm: 715 px at 0.63 mm would need 12 tiles
    assert grid is not None and len(grid.origins) == 9
    assert 0.63 < 450 / max(grid.canvas) < 0.63 * 1.25


def test_tiles_are_network_inputs_each_scaled_by_its_own_percentiles() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 5.0, (500, 400)).astype(np.float32)
    image[:, 300:] += 1000.0  # the right quarter far brighter: one scaling for the whole image would flatten the left
    grid = tile_grid(image.shape, 0.8, TILED)
    assert grid is not None
    tiles = preprocess_tiles(image, grid, TILED)
    assert len(tiles) == len(grid.origins) and all(t.shape == (1, 256, 256) and t.dtype == torch.float32 for t in tiles)
    assert all(float(t.min()) >= 0.0 and float(t.max()) <= 1.0 for t in tiles)
    left = tiles[0][0, : grid.canvas[0], : int(grid.canvas[1] * 0.4)]
    assert float(left.std()) > 0.05  # its own percentiles keep the left's texture
    assert len(network_inputs(image, TILED, grid)) == len(tiles)
    assert len(network_inputs(image, TILED, None)) == 1 and tile_grid(image.shape, 0.2, TILED) is None


def test_stitched_maps_cover_the_canvas_with_the_maximum_over_overlaps() -> None:
    grid = tile_grid((500, 400), 0.8, TILED)
    assert grid is not None
    maps = np.zeros((len(grid.origins), 256, 256), dtype=np.float32)
    maps[-1, 100, 120] = 1.0  # a hot spot in the last tile
    stitched = stitch_tiles(grid, maps)
    top, left = grid.origins[-1]
    assert stitched.shape == grid.canvas and stitched[top + 100, left + 120] == 1.0 and stitched.sum() == 1.0
    # Grad-CAM scales every tile to [0, 1]: weighted by the tiles' probabilities, a weak tile stays dim
    everywhere = np.ones((len(grid.origins), 256, 256), dtype=np.float32)
    weights = np.full(len(grid.origins), 0.05)
    weights[-1] = 0.5
    dimmed = stitch_tiles(grid, everywhere, weights)
    assert dimmed[top + 100, left + 120] == 1.0 and np.isclose(dimmed[0, 0], 0.1)


def test_decode_target_keeps_enough_pixels_for_the_canvas() -> None:
    grid = tile_grid((3000, 2500), 0.15, TILED)
    assert grid is not None
    assert decode_target((3000, 2500), 0.15, TILED) == int(max(grid.canvas) * 2.0)
    assert decode_target((3000, 2500), None, TILED) == 512
    assert math.isclose(grid.scale((3000, 2500)), max(grid.canvas) / 3000)


def test_a_dicom_header_spacing_is_what_tiles_a_radiograph() -> None:
    from fracwatch.dicom.pixels import header_spacing

    ds = Dataset()
    assert header_spacing(ds) is None
    ds.ImagerPixelSpacing = [0.2, 0.2]
    assert header_spacing(ds) == (0.2, 0.2)
    ds.PixelSpacing = [0.15, 0.16]  # calibrated at the patient: preferred
    assert header_spacing(ds) == (0.15, 0.16)


def test_the_tile_count_correction_divides_the_strongest_tiles_odds_by_the_tile_count() -> None:
    p = np.array([0.0, 0.1, 0.5, 0.9, 0.999, 1.0])
    assert np.array_equal(tile_count_corrected(p, np.ones(6)), p)  # one input: unchanged
    corrected = tile_count_corrected(p, np.full(6, 9))
    logit = np.log(p[1:-1] / (1 - p[1:-1]))
    expected = 1 / (1 + np.exp(-(logit - math.log(9))))  # the strongest logit less log n
    assert np.allclose(corrected[1:-1], expected, rtol=1e-12)
    assert corrected[0] == 0.0 and corrected[-1] == 1.0 and bool(np.all(np.diff(corrected) > 0))  # order kept
    # more tiles, more looks: the same strongest tile counts for less
    assert tile_count_corrected(np.array(0.8), np.array(4)) > tile_count_corrected(np.array(0.8), np.array(9))
