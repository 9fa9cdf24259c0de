"""The one definition of the network's input: shared by the daemon, ``predict`` and ``train``.

A radiograph of any size becomes a (1, S, S) float tensor in [0, 1]: area-downsample first (integer block mean),
then an aspect-preserving area resize of the longest side to S, robust percentile scaling to [0, 1], and a
centred zero pad. Downsampling before the percentiles keeps the cost of a full-size radiograph small
(docs/model-development.md, "Measured in the code").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import (
    Compose,
    Resize,
    ScaleIntensityRange,
    SpatialPad,
    Transform,
)

from fracwatch.resample import block_mean, downsample_factor


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters stored in the model card."""

    input_size: int = 256
    percentile_low: float = 0.5
    percentile_high: float = 99.5
    # downsample by an integer factor until the longest side is at most this many times input_size
    downsample_to: float = 2.0
    # with the image's pixel spacing known: the coarsest millimetres one input pixel may cover. An image whose
    # whole-image input would be coarser (a whole chest) is resized to this spacing and scored as overlapping
    # input_size tiles (``tile_grid``); None: always the whole image in one input
    tile_spacing_mm: float | None = None
    max_tiles: int = 9  # more would be needed: the spacing is coarsened until this many cover the image
    tile_overlap: float = 0.25  # of input_size: a break near a tile's edge lies whole inside its neighbour
    # a tiled image's fracture odds are its strongest tile's divided by its tile count (``tile_count_corrected``)
    tile_count_correction: bool = False


class BlockDownsample(Transform):
    """Area-downsample a (C, H, W) array by the largest integer factor keeping the longest side ≥ target."""

    def __init__(self, target_longest: int) -> None:
        self.target_longest = target_longest

    def __call__(self, data: np.ndarray) -> np.ndarray:
        return block_mean(np.asarray(data, dtype=np.float32), downsample_factor(data.shape, self.target_longest))


def inference_transforms(config: PreprocessConfig) -> Compose:
    """Array transforms from a decoded (1, H, W) float array to the network input (1, S, S).

    Resizing before the percentile scaling keeps the percentiles cheap (they are computed on S² pixels) and is
    exact up to the clipping, since area resampling is linear. Padding comes last so it never counts.
    """
    size = config.input_size
    return Compose(
        [
            BlockDownsample(int(size * config.downsample_to)),
            Resize(spatial_size=size, size_mode="longest", mode="area"),
            PercentileWindow(config),
            SpatialPad(spatial_size=(size, size), mode="constant"),
        ]
    )


def preprocess(image: np.ndarray, config: PreprocessConfig) -> torch.Tensor:
    """One 2-D grey image (bright = dense) → network input tensor (1, S, S), float32."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    if min(image.shape) < 8:
        raise ValueError(f"image {image.shape} is too small to score")
    result = inference_transforms(config)(np.asarray(image, dtype=np.float32)[np.newaxis])
    tensor = torch.as_tensor(np.asarray(result), dtype=torch.float32)
    return tensor.contiguous()


def content_box(shape: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an image of ``shape`` inside the padded ``size`` × ``size`` input.

    Used to map a heat map computed on the network input back onto the image.
    """
    rows, cols = shape
    scale = size / max(rows, cols)
    height, width = max(1, round(rows * scale)), max(1, round(cols * scale))
    return (size - height) // 2, (size - width) // 2, height, width


@dataclass(frozen=True)
class TileGrid:
    """An image resized to ``canvas`` (rows, cols) and covered by ``input_size`` squares at ``origins`` (top, left)
    — overlapping, edge tiles flush with the canvas; a canvas side shorter than the tile is padded."""

    canvas: tuple[int, int]
    origins: tuple[tuple[int, int], ...]
    size: int

    def scale(self, shape: tuple[int, int]) -> float:
        """Canvas pixels per image pixel for an image of ``shape``."""
        return max(self.canvas) / max(shape)


def _starts(length: int, size: int, overlap: int) -> list[int]:
    if length <= size:
        return [0]
    count = math.ceil((length - size) / (size - overlap)) + 1
    return [round(k * (length - size) / (count - 1)) for k in range(count)]


def tile_grid(shape: tuple[int, int], spacing_mm: float | None, config: PreprocessConfig) -> TileGrid | None:
    """The tiles that keep an image of ``shape`` (rows, cols) with ``spacing_mm`` per pixel at
    ``config.tile_spacing_mm`` per input pixel, or None when one whole-image input is already that fine (or the
    spacing or the tile spacing is unknown)."""
    target, size = config.tile_spacing_mm, config.input_size
    if target is None or spacing_mm is None or not spacing_mm > 0:
        return None
    extent = max(shape) * spacing_mm  # millimetres along the longest side
    if extent / size <= target:
        return None
    overlap = int(size * config.tile_overlap)
    while True:
        longest = math.ceil(extent / target)
        canvas = (max(1, round(shape[0] * longest / max(shape))), max(1, round(shape[1] * longest / max(shape))))
        rows, cols = _starts(canvas[0], size, overlap), _starts(canvas[1], size, overlap)
        if len(rows) * len(cols) <= config.max_tiles:
            return TileGrid(canvas, tuple((r, c) for r in rows for c in cols), size)
        target *= 1.05


def quantiles(values: torch.Tensor, percents: tuple[float, ...]) -> torch.Tensor:
    """``torch.quantile(values, percents / 100)`` over all of ``values`` (float32, linear interpolation) to the bit,
    by selection instead of a sort: one ``np.partition`` finds the order statistics the interpolation needs (about
    1 ms for a 256² input on a 2-core EPYC, where ``torch.quantile``'s full sort takes about 5), and the rank and
    interpolation arithmetic is torch.quantile's own, in float32."""
    flat = values.reshape(-1).to(torch.float32)
    ranks = torch.tensor([p / 100.0 for p in percents], dtype=torch.float32) * (flat.numel() - 1)
    below, above = torch.floor(ranks), torch.ceil(ranks)
    kth = sorted({int(rank) for rank in torch.cat([below, above])})
    ordered = torch.from_numpy(np.partition(flat.numpy(), kth))
    return torch.lerp(ordered[below.long()], ordered[above.long()], ranks - below)


class PercentileWindow(Transform):
    """MONAI's ``ScaleIntensityRangePercentiles(lower, upper, b_min=0, b_max=1, clip=True)`` to the bit, with its
    percentiles by ``quantiles`` instead of MONAI's ``torch.quantile`` — which was the largest single cost of
    loading an image (bench/load_workers.py); MONAI's ``ScaleIntensityRange`` does the scaling as before.

    One case differs on purpose: where both percentiles are equal (a blank exposure, a page of text on a flat
    background) MONAI returns the image less that value, unclipped — a few bright pixels reach the network as
    values in the thousands —, and this window returns all zeros, as the tiles' window always has."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.percents = (config.percentile_low, config.percentile_high)

    def __call__(self, data: np.ndarray) -> torch.Tensor:
        image = torch.as_tensor(np.asarray(data, dtype=np.float32))
        low, high = quantiles(image, self.percents)
        if high <= low:
            return torch.zeros_like(image)
        window = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)
        return torch.as_tensor(window(image))


def _windowed_tile(tile: np.ndarray, config: PreprocessConfig) -> torch.Tensor:
    # The window of ``PercentileWindow`` in numpy, written when MONAI's went through torch.quantile (far slower for
    # nine tiles; bench/tiles.py). Not bit-equal to ``PercentileWindow``: numpy interpolates
    # the percentiles and scales in float64. Kept as it is: every tiled figure of the shipped bundles (0.6.1 on) was
    # measured with it, and rounding-level changes move the operating points' boundary cases.
    low, high = np.percentile(tile, [config.percentile_low, config.percentile_high])
    scaled = np.clip((tile - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(tile)
    out = np.zeros((1, config.input_size, config.input_size), dtype=np.float32)
    out[0, : tile.shape[0], : tile.shape[1]] = scaled  # padded at the end
    return torch.from_numpy(out)


def preprocess_tiles(image: np.ndarray, grid: TileGrid, config: PreprocessConfig) -> list[torch.Tensor]:
    """One 2-D grey image → its ``grid``'s network inputs (1, S, S), each scaled by its own percentiles (a tile
    looks like a detail view of that region); a tile short of S at a canvas edge is padded at its end."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    data = BlockDownsample(int(max(grid.canvas) * config.downsample_to))(np.asarray(image, dtype=np.float32)[None])
    upsampling = max(grid.canvas) > max(data.shape[-2:])
    canvas = np.asarray(Resize(spatial_size=grid.canvas, mode="bilinear" if upsampling else "area")(data))[0]
    size = config.input_size
    return [_windowed_tile(canvas[top : top + size, left : left + size], config) for top, left in grid.origins]


def network_inputs(image: np.ndarray, config: PreprocessConfig, grid: TileGrid | None) -> list[torch.Tensor]:
    """The network inputs of one 2-D image: the tiles of ``grid`` (``tile_grid``), or one whole-image input
    (``preprocess``) where it is None. The image's score is the maximum over them."""
    return [preprocess(image, config)] if grid is None else preprocess_tiles(image, grid, config)


def tile_count_corrected(probability: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """The fracture probability of images scored as the strongest of ``tiles`` inputs each, from that strongest
    input's ``probability``: its odds divided by the count (``tiles`` 1: unchanged).

    The strongest of n looks at a normal image fires about n times as often as one look does (a Bonferroni
    correction, in odds): uncorrected, a tiled whole chest's normals outrank detail views' normals — one input
    each — and both share one threshold. Equivalent to subtracting log n from the strongest logit."""
    p = np.asarray(probability, dtype=np.float64)
    n = np.asarray(tiles, dtype=np.float64)
    return p / (p + n * (1.0 - p))


def stitch_tiles(grid: TileGrid, maps: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Per-tile (n, S, S) maps (Grad-CAM) → one map over the grid's canvas, the maximum where tiles overlap.

    Grad-CAM scales each tile's map to [0, 1] on its own, so every tile would show a hot spot; ``weights`` (n,) —
    the tiles' fracture probabilities — scale each by its share of the strongest, so a tile the network finds
    nothing in stays dim."""
    if weights is not None:
        share = np.asarray(weights, dtype=np.float32) / max(float(np.max(weights)), 1e-6)
        maps = maps * share[:, None, None]
    out = np.zeros(grid.canvas, dtype=np.float32)
    for (top, left), tile in zip(grid.origins, maps, strict=True):
        window = out[top : top + grid.size, left : left + grid.size]
        np.maximum(window, tile[: window.shape[0], : window.shape[1]], out=window)
    return out


def decode_target(shape: tuple[int, int], spacing_mm: float | None, config: PreprocessConfig) -> int:
    """The longest side to decode an image of ``shape`` (rows, cols) at, before its inputs are made: integer
    downsampling keeps at least ``downsample_to`` × the longest side the network inputs are cut from."""
    grid = tile_grid(shape, spacing_mm, config)
    return int((max(grid.canvas) if grid is not None else config.input_size) * config.downsample_to)
