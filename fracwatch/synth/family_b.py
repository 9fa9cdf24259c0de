"""A second synthetic-radiograph family, for evaluation only: a model trained on ``fracwatch synth`` (family A) is
scored on images whose fractures and rendering were made differently, so its card can say what it is worth off
its own generator. Never train on it: its manifest puts every image in an ``external`` split, and ``train`` refuses
a set whose ``synth.json`` names this family.

Shared with family A: only the CT and its preparation (``ct.load_ct``: attenuation, bone labels). Different:

- **Fracture model:** a fragment — the bone voxels within 6–14 mm of a point on one side of a random plane
  through it — is lifted out and put back displaced 0.5–4 mm (a random direction) and tilted 0–8°; the voxels it
  left are filled with soft tissue, a third of them with callus-like bone at 15–35 % of the block's densest.
  Family A cuts a gap along the bone's own axis.
- **Projection:** parallel beams along Y (anterior to posterior), tilted in the axial plane by shearing each
  coronal slab sideways (yaw −20…20°), a line integral summed slab by slab; family A casts diverging rays from a
  point source through poses.
- **Detector and processing:** energy scaling of the attenuation (0.8–1.25), scatter as a wide blurred fraction
  of the primary (5–25 %), exponential attenuation with quantum noise at an exposure drawn per image, detector
  blur, then a log transform, unsharp-mask edge enhancement and a sigmoid display LUT (centre and width from the
  image's own histogram) — family A windows its DRR by percentiles.
- **Views:** detail crops 60–160 mm across centred near the break (jittered), 256–448 px; every normal is its
  fractured image's twin (same crop, exposure and noise), so nothing but the break separates the classes.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter, map_coordinates, zoom

from fracwatch.synth.ct import CTVolume, SynthError
from fracwatch.synth.render import MANIFEST_FIELDS

FAMILY = "b"
CLASSES = ("rib", "clavicle", "humerus")


@dataclass(frozen=True)
class Break:
    """One simulated break: where (voxel z, y, x), the fragment's radius, displacement and tilt."""

    centre: tuple[int, int, int]
    radius_mm: float
    shift_mm: float
    tilt_deg: float
    callus: float


def _fragment(ct: CTVolume, rng: np.random.Generator, label: int) -> tuple[torch.Tensor, tuple[int, int, int], Break]:
    """The bone-excess block around a point of ``label`` with a displaced fragment, and the block's origin."""
    points = ct.voxels(label)
    z, y, x = (int(v) for v in points[int(rng.integers(len(points)))].tolist())
    centre = (z, y, x)
    radius = float(rng.uniform(6, 14)) / ct.spacing
    half = math.ceil(radius + 8)
    origin = (max(0, z - half), max(0, y - half), max(0, x - half))
    end = tuple(min(n, c + half + 1) for c, n in zip(centre, ct.shape, strict=True))
    block = ct.bone[origin[0] : end[0], origin[1] : end[1], origin[2] : end[2]].numpy().copy()
    grid = np.stack(np.meshgrid(*[np.arange(o, e) for o, e in zip(origin, end, strict=True)], indexing="ij"))
    offset = grid - np.array(centre)[:, None, None, None]
    normal = rng.normal(size=3)
    normal /= np.linalg.norm(normal)
    side = np.tensordot(normal, offset, axes=1) > 0
    inside = (np.sqrt((offset**2).sum(axis=0)) <= radius) & side & (block > 0)
    shift_mm, tilt = float(rng.uniform(0.5, 4.0)), float(rng.uniform(0.0, 8.0))
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    angle = math.radians(tilt)
    axis = np.cross(normal, direction)
    axis = axis / (np.linalg.norm(axis) or 1.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k
    fragment = np.where(inside, block, 0.0)
    rest = np.where(inside, 0.0, block)
    # the fragment moved: sample it back through the inverse motion (rotation about the centre, then the shift)
    local = offset.reshape(3, -1)
    source = rotation.T @ (local - (direction * shift_mm / ct.spacing)[:, None])
    source = source + (np.array(centre) - np.array(origin))[:, None]
    moved = map_coordinates(fragment, source, order=1, mode="constant").reshape(block.shape)
    callus = float(rng.uniform(0.3, 0.7))
    gap = inside & (moved <= 0)
    fill = np.where(gap & (rng.random(block.shape) < 0.35), callus * block.max() * 0.5, 0.0)
    result = np.maximum(rest, moved) + fill
    record = Break(centre, radius * ct.spacing, shift_mm, tilt, callus)
    return torch.from_numpy(result.astype(np.float32)), origin, record


def _sheared_projection(volume: torch.Tensor, yaw_deg: float) -> np.ndarray:
    """Line integrals along Y tilted by ``yaw_deg`` in the axial plane: each coronal slab y shifted by
    y·tan(yaw) voxels along X (linear interpolation), then summed over Y. (Z, X) image."""
    tan = math.tan(math.radians(yaw_deg))
    depth = volume.shape[1]
    out = torch.zeros(volume.shape[0], volume.shape[2])
    for y in range(depth):
        shift = (y - depth / 2) * tan
        whole, frac = math.floor(shift), shift - math.floor(shift)
        slab = volume[:, y, :]
        rolled = torch.roll(slab, whole, dims=1) * (1 - frac) + torch.roll(slab, whole + 1, dims=1) * frac
        out += rolled
    return out.numpy()


def _detected(integral: np.ndarray, rng: np.random.Generator, pixels_per_mm: float) -> np.ndarray:
    """Detector and processing up to the display LUT: scatter, exponential attenuation with quantum noise, blur,
    log and unsharp-mask edge enhancement. ``rng`` seeded alike for twins draws the same settings and noise."""
    scaled = integral * float(rng.uniform(0.8, 1.25))
    primary = np.exp(-scaled)
    scatter = gaussian_filter(primary, sigma=30 * pixels_per_mm) * float(rng.uniform(0.05, 0.25))
    photons = float(rng.uniform(800, 4000))
    signal = np.clip(primary + scatter, 1e-6, None)
    # quantum noise (Poisson, in its normal approximation) from one field of draws: a twin pair shares it exactly
    detected = signal + np.sqrt(signal / photons) * rng.standard_normal(signal.shape)
    detected = gaussian_filter(detected, sigma=float(rng.uniform(0.4, 1.0)))
    density = -np.log(np.clip(detected, 1e-4, None))
    blurred = gaussian_filter(density, sigma=float(rng.uniform(5, 15)) * pixels_per_mm)
    return density + float(rng.uniform(0.3, 1.0)) * (density - blurred)


def _lut(reference: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A sigmoid display LUT's centre and width from ``reference``'s histogram (the normal twin's: one LUT for
    both, so the break changes nothing else)."""
    low, mid, high = np.percentile(reference, [2, 50, 98])
    return float(mid), max(float(high - low), 1e-6) * float(rng.uniform(0.2, 0.35))


def _display(enhanced: np.ndarray, lut: tuple[float, float]) -> np.ndarray:
    """12-bit grey, bone bright."""
    centre, width = lut
    return np.clip(4095 / (1.0 + np.exp(-(enhanced - centre) / width)), 0, 4095).astype(np.uint16)


def render(ct: CTVolume, out: Path, images: int, seed: int = 0) -> Path:
    """``images`` detail views (half fractured, each normal the twin of a fractured one) into ``out``."""
    if images < 2:
        raise SynthError("family b renders at least one fractured image and its twin")
    labels = [label for cls in CLASSES for label in ct.labels_of(cls)]
    if not labels:
        raise SynthError("the CT has no rib, clavicle or humerus labels to break")
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    attenuation = ct.soft + ct.bone
    rows: list[dict[str, object]] = []
    projections: dict[int, np.ndarray] = {}
    for pair in range(images // 2):
        label = labels[int(rng.integers(len(labels)))]
        yaw = float(rng.choice([-20, -10, 0, 10, 20]))
        if int(yaw) not in projections:
            projections[int(yaw)] = _sheared_projection(attenuation, yaw)
        base = projections[int(yaw)]
        block, origin, record = _fragment(ct, rng, label)
        z0, y0, x0 = origin
        dz, dy, dx = block.shape
        delta = torch.zeros(dz, attenuation.shape[1], attenuation.shape[2])  # only the block's rows change
        delta[:, y0 : y0 + dy, x0 : x0 + dx] = block - ct.bone[z0 : z0 + dz, y0 : y0 + dy, x0 : x0 + dx]
        fractured = base.copy()
        fractured[z0 : z0 + dz] += _sheared_projection(delta, yaw)
        fov_mm = float(rng.uniform(60, 160))
        size = int(rng.integers(256, 449))
        half = fov_mm / ct.spacing / 2
        cz = record.centre[0] + rng.uniform(-0.25, 0.25) * half
        depth = attenuation.shape[1]
        cx = record.centre[2] + (record.centre[1] - depth / 2) * math.tan(math.radians(yaw))
        cx += rng.uniform(-0.25, 0.25) * half
        top, left = int(max(0, cz - half)), int(max(0, cx - half))
        bottom, right = int(min(base.shape[0], cz + half)), int(min(base.shape[1], cx + half))
        if bottom - top < 16 or right - left < 16:
            continue
        factor = size / max(bottom - top, right - left)
        noise_seed = int(rng.integers(2**31))
        crops = {kind: zoom(image[top:bottom, left:right], factor, order=3) for kind, image in
                 ((True, fractured), (False, base))}  # fmt: skip
        enhanced = {kind: _detected(crop, np.random.default_rng(noise_seed), factor / ct.spacing)
                    for kind, crop in crops.items()}  # fmt: skip
        lut = _lut(enhanced[False], rng)
        for fractured_image, crop in crops.items():
            pixels = _display(enhanced[fractured_image], lut)
            name = f"b{pair:04d}_{'f' if fractured_image else 'n'}.png"
            Image.fromarray(pixels).save(out / "images" / name, compress_level=1)
            box = _box(record, top, left, factor, yaw, depth, ct.spacing, crop.shape)
            rows.append(_row(name, fractured_image, label, ct, yaw, fov_mm, factor, pair, record, box))
    with (out / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    description = {"family": FAMILY, "ct": ct.source, "spacing_mm": ct.spacing, "images": len(rows), "seed": seed}
    (out / "synth.json").write_text(json.dumps(description, indent=2) + "\n")
    return out / "manifest.csv"


def _box(
    record: Break, top: int, left: int, factor: float, yaw: float, depth: int, spacing: float, shape: tuple[int, ...]
) -> tuple[int, int, int, int]:
    """The break's projected box (x0, y0, x1, y1) in the image's pixels: the fragment's sphere."""
    z, y, x = record.centre
    column = x + (y - depth / 2) * math.tan(math.radians(yaw))
    r = record.radius_mm / spacing
    x0, x1 = (column - r - left) * factor, (column + r - left) * factor
    y0, y1 = (z - r - top) * factor, (z + r - top) * factor
    height, width = shape[0], shape[1]
    return (int(max(0, x0)), int(max(0, y0)), int(min(width - 1, x1)), int(min(height - 1, y1)))


def _row(
    name: str,
    fractured: bool,
    label: int,
    ct: CTVolume,
    yaw: float,
    fov_mm: float,
    factor: float,
    pair: int,
    record: Break,
    box: tuple[int, int, int, int],
) -> dict[str, object]:
    row: dict[str, object] = dict.fromkeys(MANIFEST_FIELDS, "")
    row.update(
        image=f"images/{name}",
        label=int(fractured),
        bone_class=ct.bone_class(label) or "",
        bone=ct.names.get(label, ""),
        view="AP",
        yaw_deg=yaw,
        tilt_deg=0,
        fov="detail",
        pixel_spacing_mm=round(ct.spacing / factor, 5),
        photometric="MONOCHROME2",
        split="external",  # evaluation only: evaluate --split external
        pose=pair,
        index=0 if fractured else 1,
        twin_of="" if fractured else 0,
        shift_mm=round(record.shift_mm, 2),
        angle_deg=round(record.tilt_deg, 2),
    )
    if fractured:
        row.update(x0=box[0], y0=box[1], x1=box[2], y1=box[3])
    return row
