"""Labelled image sets for training and evaluation, in the layouts the field uses, loaded through the daemon's
own pipeline (``service.scoring.load_file``: the same decoding, LUTs and MONAI transforms as inference).

Layouts (``detect_layout`` picks one):
- ``manifest``: a ``fracwatch synth`` folder (``manifest.csv`` with ``image``, ``label``, ``split``, ...);
- ``folder``: class subfolders, e.g. FracAtlas ``images/Fractured`` + ``images/Non_fractured``, or Kaggle
  ``train|val|test/fractured|not fractured`` (split folders are kept as splits);
- ``csv``: a CSV with ``path`` (or ``image``/``file``) and ``label`` columns, paths relative to the CSV;
- ``dicom``: a folder of DICOM files plus ``--labels CSV`` keyed by ``sop_instance_uid`` or file name.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from fracwatch.errors import FracwatchError
from fracwatch.pipeline.pictures import PICTURE_SUFFIXES
from fracwatch.pipeline.transforms import PreprocessConfig, TileGrid, content_box, tile_grid
from fracwatch.service.scoring import load_file

LOGGER = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)

LAYOUTS = ("manifest", "folder", "csv", "dicom")
POSITIVE_NAMES = re.compile(r"^(fractured?|positive|abnormal|1|yes|true)$", re.IGNORECASE)
NEGATIVE_NAMES = re.compile(r"^(non[ _-]?fractured?|not[ _]fractured?|normal|negative|0|no|false)$", re.IGNORECASE)
# network-input pixel size bands (mm) for evaluation breakdowns: a 1-3 mm break spans over 2.5-7.5 px in the
# first, 1.25-3.75 px or fewer in the last
SPACING_BANDS = (("< 0.4 mm", 0.4), ("0.4-0.8 mm", 0.8), ("≥ 0.8 mm", math.inf))
# a manifest's descriptive columns, kept per item (breakdowns, evaluate's scores.csv)
META_COLUMNS = (
    "view", "bone_class", "fov", "photometric", "bone", "pixel_spacing_mm", "gap_mm", "shift_mm", "angle_deg",
    "comminuted", "visibility",
)  # fmt: skip
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class DatasetError(FracwatchError):
    """A data set cannot be read as asked."""


@dataclass(frozen=True)
class Item:
    """One labelled image: its file, binary label, optional class name, split and descriptive columns."""

    path: Path
    label: int
    class_name: str = ""
    split: str = ""
    group: str = ""  # images sharing a group (a synth pose, a patient) never straddle folds or splits
    meta: dict[str, str] = field(default_factory=dict)
    box: tuple[float, float, float, float] | None = None  # the fracture's (x0, y0, x1, y1) in image pixels
    size: tuple[int, int] | None = None  # the image's (width, height), with a box
    pair: str = ""  # a fractured image and its twin without the break (synth) share this key


def _label(value: str, where: str) -> int:
    text = value.strip()
    if POSITIVE_NAMES.match(text):
        return 1
    if NEGATIVE_NAMES.match(text):
        return 0
    raise DatasetError(f"{where}: label {value!r} is neither fractured nor not fractured")


def detect_layout(source: Path) -> str:
    """The layout of ``source`` (a folder or a CSV file)."""
    if source.is_file() and source.suffix.lower() == ".csv":
        return "csv"
    if (source / "manifest.csv").is_file():
        return "manifest"
    if source.is_dir():
        names = {p.name.lower() for p in source.rglob("*") if p.is_dir()}
        if any(POSITIVE_NAMES.match(n) or NEGATIVE_NAMES.match(n) for n in names):
            return "folder"
        return "dicom"
    raise DatasetError(f"{source} is neither a folder nor a CSV file")


def read_manifest(folder: Path) -> list[Item]:
    """A ``fracwatch synth`` folder; fractured images carry their projected box (for the localisation loss): the
    break site's where recorded — the gap and step-off within a few mm of the cut, not the fragment's drift."""
    items = []
    with (folder / "manifest.csv").open(newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            path = folder / row["image"]
            items.append(
                Item(
                    path=path,
                    label=int(row["label"]),
                    class_name=row.get("bone_class") or ("fracture" if row["label"] == "1" else "none"),
                    split=row.get("split", ""),
                    group=f"pose{row.get('pose', '')}",
                    pair=_pair_key(row),
                    meta={k: row.get(k, "") for k in META_COLUMNS},
                    **_box(row, path, f"{folder / 'manifest.csv'}:{number}"),
                )
            )
    return items


def _pair_key(row: dict[str, str]) -> str:
    """The key a fractured synth image shares with its twin (``twin_of`` names the fractured image's index)."""
    index = row.get("twin_of") or (row.get("index", "") if row.get("label") == "1" else "")
    return f"pose{row.get('pose', '')}/{index}" if index else ""


def twin_partners(items: Sequence[Item]) -> torch.Tensor | None:
    """(N,) index of each item's twin (-1 for none), or None when no item has one."""
    members: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        if item.pair:
            members.setdefault(item.pair, []).append(index)
    partners = torch.full((len(items),), -1, dtype=torch.long)
    for first, *rest in members.values():
        if len(rest) == 1:
            partners[first], partners[rest[0]] = rest[0], first
    return partners if bool((partners >= 0).any()) else None


def _box(row: dict[str, str], path: Path, where: str) -> dict[str, Any]:
    """``box`` and ``size`` of a fractured manifest row (whose image exists): the break site's box
    (``site_x0..site_y1``) where the manifest has one, else the whole change's (``x0..y1``); else nothing."""
    site = [row.get(k, "") for k in ("site_x0", "site_y0", "site_x1", "site_y1")]
    values = site if all(site) else [row.get(k, "") for k in ("x0", "y0", "x1", "y1")]
    if row.get("label") != "1" or not all(values) or not path.is_file():
        return {}
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
        with Image.open(path) as picture:  # reads the header only
            size = picture.size
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{where}: bad box {values} or unreadable image ({exc})") from None
    if not (0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]):
        raise DatasetError(f"{where}: box {values} is not inside the {size[0]} × {size[1]} image")
    return {"box": (x0, y0, x1, y1), "size": size}


def input_spacing_band(item: Item, config: PreprocessConfig) -> str:
    """The millimetres one network-input pixel covers (``pixel_spacing_mm`` × the image's longest side over the
    input's, or over its tile canvas's where ``config`` tiles it), as a band — "" where the item has no spacing
    (not a synth manifest) or its image cannot be read."""
    spacing = item_spacing(item)
    if spacing is None:
        return ""
    try:
        shape = _shape(item)
    except OSError:
        return ""
    grid = tile_grid(shape, spacing, config)
    mm = spacing * max(shape) / (max(grid.canvas) if grid is not None else config.input_size)
    return next((band for band, upper in SPACING_BANDS if mm < upper), SPACING_BANDS[-1][0])


def _shape(item: Item) -> tuple[int, int]:
    """(rows, cols) of an item's image: from the manifest's box columns, else the picture's header."""
    if item.size is not None:
        return item.size[1], item.size[0]
    with Image.open(item.path) as picture:  # reads the header only
        return picture.size[1], picture.size[0]


def input_boxes(items: Sequence[Item], size: int) -> torch.Tensor:
    """(N, 4) boxes (x0, y0, x1, y1) in whole-image network-input pixels (``preprocess``'s resize and pad), NaN
    where none."""
    boxes = torch.full((len(items), 4), float("nan"))
    for index, item in enumerate(items):
        if item.box is None or item.size is None:
            continue
        width, height = item.size
        top, left, rows, cols = content_box((height, width), size)
        x0, y0, x1, y1 = item.box
        sx, sy = cols / width, rows / height
        boxes[index] = torch.tensor([left + x0 * sx, top + y0 * sy, left + x1 * sx, top + y1 * sy])
    return boxes


def box_tile(item: Item, grid: TileGrid) -> tuple[int, tuple[float, float, float, float]]:
    """The tile of ``grid`` that holds an item's box best (its centre farthest inside) and the box in that
    tile's input pixels (clipped to it)."""
    assert item.box is not None and item.size is not None
    scale = grid.scale((item.size[1], item.size[0]))
    x0, y0, x1, y1 = (value * scale for value in item.box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2

    def inside(origin: tuple[int, int]) -> float:
        top, left = origin
        return min(cx - left, left + grid.size - cx, cy - top, top + grid.size - cy)

    best = max(range(len(grid.origins)), key=lambda k: inside(grid.origins[k]))
    top, left = grid.origins[best]
    box = (x0 - left, y0 - top, x1 - left, y1 - top)
    x0, y0, x1, y1 = (min(max(value, 0.0), float(grid.size)) for value in box)
    return best, (x0, y0, x1, y1)


def item_grids(items: Sequence[Item], config: PreprocessConfig) -> list[TileGrid | None]:
    """Each item's tile grid under ``config`` (None: one whole-image input), from its manifest spacing and its
    image's header — no pixels read (what ``load_inputs`` returns as ``grids`` for manifest items)."""
    return [
        tile_grid(_shape(item), spacing, config) if (spacing := item_spacing(item)) is not None else None
        for item in items
    ]


@dataclass(frozen=True)
class ChosenTiles:
    """Where one input per item is wanted (training, breaks seen): ``tiles`` — the tile that stands for each
    item, None for its whole image — and ``boxes`` (N, 4), its fracture's box in that input's pixels, NaN where
    none."""

    tiles: list[int | None]
    boxes: torch.Tensor


def chosen_tiles(items: Sequence[Item], grids: Sequence[TileGrid | None], size: int) -> ChosenTiles:
    """A tiled item stands as the tile that holds its fracture's box best, a fractured image's twin as the same
    tile (same pose, same grid); an item no box places (no grid, or a data set without boxes) as its whole
    image."""
    tiles: list[int | None] = [None] * len(items)
    boxes = input_boxes(items, size)
    for index, (item, grid) in enumerate(zip(items, grids, strict=True)):
        if grid is not None and item.box is not None and item.size is not None:
            best, box = box_tile(item, grid)
            tiles[index], boxes[index] = best, torch.tensor(box)
    partners = twin_partners(items)
    for index, item in enumerate(items):
        twin = int(partners[index]) if partners is not None else -1
        tile = tiles[index]
        if item.label == 1 and twin >= 0 and tile is not None and (grid := grids[twin]) is not None:
            tiles[twin] = min(tile, len(grid.origins) - 1)
    return ChosenTiles(tiles, boxes)


def read_folder(root: Path) -> list[Item]:
    """Class subfolders (FracAtlas, Kaggle and alike); a ``train``/``val``/``test`` parent becomes the split."""
    items = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not (path.suffix.lower() in PICTURE_SUFFIXES or path.suffix.lower() == ".dcm"):
            continue
        parts = [p.lower() for p in path.relative_to(root).parts[:-1]]
        labels = [i for i, part in enumerate(parts) if POSITIVE_NAMES.match(part) or NEGATIVE_NAMES.match(part)]
        if not labels:
            continue
        class_folder = parts[labels[-1]]
        split = next((SPLIT_NAMES[p] for p in parts if p in SPLIT_NAMES), "")
        label = _label(class_folder, str(path))
        items.append(Item(path=path, label=label, class_name="fracture" if label else "none", split=split))
    return items


def read_csv(path: Path) -> list[Item]:
    """A CSV of ``path,label`` (also ``image``/``file``; optional ``split``, ``group``, ``class``)."""
    items = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = {c.lower(): c for c in reader.fieldnames or []}
        file_column = next((columns[c] for c in ("path", "image", "file", "filename") if c in columns), None)
        if file_column is None or "label" not in columns:
            raise DatasetError(f"{path} needs a path (or image/file) column and a label column")
        for number, row in enumerate(reader, start=2):
            label = _label(row[columns["label"]], f"{path}:{number}")
            items.append(
                Item(
                    path=(path.parent / row[file_column]).resolve(),
                    label=label,
                    class_name=row.get(columns.get("class", ""), "") or ("fracture" if label else "none"),
                    split=SPLIT_NAMES.get(row.get(columns.get("split", ""), "").lower(), ""),
                    group=row.get(columns.get("group", ""), ""),
                )
            )
    return items


def read_dicom_folder(root: Path, labels_csv: Path | None) -> list[Item]:
    """DICOM files under ``root`` labelled by a CSV keyed by ``sop_instance_uid`` (or ``file``)."""
    if labels_csv is None:
        raise DatasetError(f"{root} holds DICOM files: give their labels with --labels CSV")
    by_key: dict[str, str] = {}
    with labels_csv.open(newline="") as handle:
        reader = csv.DictReader(handle)
        key = next((k for k in ("sop_instance_uid", "file", "path") if k in (reader.fieldnames or [])), None)
        if key is None or "label" not in (reader.fieldnames or []):
            raise DatasetError(f"{labels_csv} needs a sop_instance_uid (or file) column and a label column")
        for row in reader:
            by_key[row[key].strip()] = row["label"]
    items = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "PatientID"])
        except (InvalidDicomError, OSError):
            continue
        value = by_key.get(str(ds.get("SOPInstanceUID", ""))) or by_key.get(path.name)
        if value is None:
            continue
        label = _label(value, str(path))
        group = str(ds.get("PatientID", ""))
        items.append(Item(path=path, label=label, class_name="fracture" if label else "none", group=group))
    if not items:
        raise DatasetError(f"no DICOM file under {root} has a label in {labels_csv}")
    return items


def read_dataset(source: Path, layout: str = "auto", labels_csv: Path | None = None) -> list[Item]:
    """Every labelled item of ``source``; raises :class:`DatasetError` with the reason."""
    if not source.exists():
        raise DatasetError(f"{source} does not exist")
    chosen = detect_layout(source) if layout == "auto" else layout
    readers: dict[str, Callable[[], list[Item]]] = {
        "manifest": lambda: read_manifest(source),
        "folder": lambda: read_folder(source),
        "csv": lambda: read_csv(source),
        "dicom": lambda: read_dicom_folder(source, labels_csv),
    }
    if chosen not in readers:
        raise DatasetError(f"layout must be one of auto, {', '.join(LAYOUTS)}")
    items = readers[chosen]()
    if not items:
        raise DatasetError(f"{source} ({chosen} layout) holds no labelled image")
    missing = [i.path for i in items if not i.path.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} listed files do not exist, e.g. {missing[0]}")
    return items


def assign_splits(items: Sequence[Item], val_fraction: float, seed: int) -> list[Item]:
    """Keep given splits; put unsplit items in train/val by group (or by item), stratified by label."""
    rng = np.random.default_rng(seed)
    out = []
    groups: dict[str, str] = {}
    for item in items:
        if item.split:
            out.append(item)
            continue
        key = item.group or str(item.path)
        if key not in groups:
            groups[key] = "val" if rng.random() < val_fraction else "train"
        out.append(replace(item, split=groups[key]))
    return out


def item_spacing(item: Item) -> float | None:
    """A picture's millimetres per pixel from its manifest row (synth), else None (a DICOM file's comes from its
    header when it is loaded)."""
    try:
        spacing = float(item.meta.get("pixel_spacing_mm", ""))
    except ValueError:
        return None
    return spacing if spacing > 0 else None


@dataclass(frozen=True)
class LoadedInputs:
    """The network inputs of a list of items: ``images`` (M, 1, S, S) float16, ``owners`` (M,) the item each
    belongs to (ascending; one input per item, or its tiles), ``grids`` the tile grid per item (None: whole)."""

    images: torch.Tensor
    owners: torch.Tensor
    grids: list[TileGrid | None]

    def first(self) -> torch.Tensor:
        """(N,) position of each item's first input in ``images``."""
        counts = torch.bincount(self.owners, minlength=len(self.grids))
        return torch.cumsum(counts, 0) - counts

    @property
    def one_per_item(self) -> bool:
        """Whether no item was tiled (``images`` holds exactly one input per item)."""
        return len(self.images) == len(self.grids)


class _Preprocessed(torch.utils.data.Dataset[tuple[list[torch.Tensor], TileGrid | None, str]]):
    """Items through the daemon's pipeline, one by one: (the first frame's inputs, its tile grid, the error)."""

    def __init__(self, items: Sequence[Item], config: PreprocessConfig, tiles: Sequence[int | None] | None) -> None:
        self.items, self.config, self.tiles = items, config, tiles

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], TileGrid | None, str]:
        item = self.items[index]
        tile = self.tiles[index] if self.tiles is not None else None
        whole = self.tiles is not None and tile is None
        loaded = load_file(item.path, replace(self.config, tile_spacing_mm=None) if whole else self.config,
                           item_spacing(item))  # fmt: skip
        if loaded.error is not None or not loaded.inputs:
            return [], None, loaded.error or "no image"
        inputs = loaded.display_inputs
        if tile is not None:
            inputs = [inputs[min(tile, len(inputs) - 1)]]
        return [tensor.to(torch.float16) for tensor in inputs], loaded.grid, ""


@dataclass(frozen=True)
class _Batch:
    """A batch of ``_Preprocessed`` items as it leaves a worker: their inputs stacked into one tensor — one shared
    memory segment for the batch, not one per input, which this process would have to map, copy and release one
    by one — with each item's input count, tile grid and error."""

    inputs: torch.Tensor  # (sum(counts), 1, S, S) float16
    counts: list[int]
    grids: list[TileGrid | None]
    errors: list[str]


def _stacked(batch: list[tuple[list[torch.Tensor], TileGrid | None, str]]) -> _Batch:
    """``load_inputs``' collate function: runs in the worker that decoded the batch."""
    inputs = [tensor for item_inputs, _grid, _error in batch for tensor in item_inputs]
    return _Batch(
        torch.stack(inputs) if inputs else torch.empty(0),
        [len(item_inputs) for item_inputs, _grid, _error in batch],
        [grid for _inputs, grid, _error in batch],
        [error for _inputs, _grid, error in batch],
    )


def load_inputs(
    items: Sequence[Item],
    config: PreprocessConfig,
    progress: Callable[[int], None] | None = None,
    workers: int = 0,
    tiles: Sequence[int | None] | None = None,
) -> LoadedInputs:
    """Every item's network inputs (first frame; its tiles where ``config`` tiles it — or, with ``tiles``, its
    ``tiles[i]``-th tile only, its whole image where that is None)
    through the daemon's pipeline — in this process, or decoded by ``workers`` DataLoader processes (one thread
    each; the same tensors, in order). An unreadable image stops the load with a ``DatasetError`` naming its
    file; DataLoader refuses ``workers < 0``."""
    loader = torch.utils.data.DataLoader(
        _Preprocessed(items, config, tiles), batch_size=16, num_workers=workers, collate_fn=_stacked
    )
    chunks: list[torch.Tensor] = []
    owners: list[int] = []
    grids: list[TileGrid | None] = []
    for batch in loader:
        for count, grid, error in zip(batch.counts, batch.grids, batch.errors, strict=True):
            if error:
                raise DatasetError(f"{items[len(grids)].path}: {error}")
            owners.extend([len(grids)] * count)
            grids.append(grid)
        if len(batch.inputs):
            # copied out of the worker's shared memory: kept alive, tens of thousands of segments would exhaust
            # this process's file descriptors
            chunks.append(batch.inputs.clone())
        if progress is not None:
            progress(len(grids))
    size = config.input_size
    images = torch.cat(chunks) if chunks else torch.empty((0, 1, size, size), dtype=torch.float16)
    return LoadedInputs(images, torch.tensor(owners, dtype=torch.long), grids)


def load_tensors(
    items: Sequence[Item],
    config: PreprocessConfig,
    progress: Callable[[int], None] | None = None,
    workers: int = 0,
) -> torch.Tensor:
    """Preprocessed (N, 1, S, S) float16 inputs, one per item: its chosen tile where ``config`` tiles it and a box
    says which (``chosen_tiles``), else its whole image — what training's tensors are."""
    tiled = config.tile_spacing_mm is not None
    tiles = chosen_tiles(items, item_grids(items, config), config.input_size).tiles if tiled else None
    return load_inputs(items, config, progress, workers, tiles).images
