"""Fractures simulated in the CT: a local change to one bone's attenuation, returned as a small box.

A point on the bone is chosen where it is elongated; its local axis comes from a PCA of the bone around it.
A plane across that axis (tilted up to 15°) cuts the bone — given the view's beam, a plane the rays run nearly
along, so the view shows the break (a radiograph's fracture label means a fracture the image shows) —; a 1-3 mm
gap opens, and the fragment beyond it is displaced (0-4 mm, mostly across the rays) and angulated (0-10°), the
motion fading out along the bone so the box edges stay untouched; sometimes a second cut makes an intermediate
fragment (comminution). Only the bone's excess attenuation over soft tissue moves, so the change is
``new bone - old bone`` inside the box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fracwatch.synth.ct import CTVolume, SynthError

NEIGHBOURHOOD_MM = {"rib": 12.0, "clavicle": 14.0, "humerus": 30.0, "scapula": 20.0}
HALF_BOX_MM = 24.0
SITE_MM = 4.0  # the break site: this far either side of the cut(s); the fragment's drift beyond is not the break
ACROSS_BEAM = 0.15  # |cut plane normal · beam| at most this (the plane within ~9° of the rays): a 1 mm gap
# through 5 mm of bone stays open in projection only when tan(angle) < 1/5


@dataclass(frozen=True)
class Fracture:
    """A simulated fracture: the attenuation change ``delta`` (a box at ``origin``) and what was done."""

    delta: torch.Tensor  # (z, y, x) change of the bone attenuation
    origin: tuple[int, int, int]
    centre: tuple[float, float, float]  # voxel (z, y, x)
    normal: tuple[float, float, float]  # the cut plane's unit normal (z, y, x)
    site: torch.Tensor  # |delta| within SITE_MM of the cut(s): where the break itself shows (gap, step-off)
    label: int
    bone: str  # structure name, e.g. rib_left_5
    bone_class: str
    gap_mm: float
    shift_mm: float
    angle_deg: float
    comminuted: bool


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _local_axis(points: np.ndarray, centre: np.ndarray, radius: float) -> tuple[np.ndarray, float] | None:
    """The bone's principal axis within ``radius`` of ``centre`` and how elongated it is there, or None where too
    few voxels lie near. ``points`` are sorted by z (``torch.nonzero``'s row-major order), so only the slab of
    points within ``radius`` in z is measured: the same points in the same order as measuring all of them."""
    slab = points[np.searchsorted(points[:, 0], centre[0] - radius) : np.searchsorted(
        points[:, 0], centre[0] + radius, side="right"
    )]  # fmt: skip
    near = slab[np.linalg.norm(slab - centre, axis=1) < radius]
    if len(near) < 30:
        return None
    values, vectors = np.linalg.eigh(np.cov((near - near.mean(axis=0)).T))
    elongation = float(values[-1] / max(values[-2], 1e-6))
    return vectors[:, -1], elongation


def _cut_normal(axis: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The normal of a plane across ``axis``, tilted up to 15° about a random direction."""
    return _rotation(np.cross(axis, _random_unit(rng)), math.radians(rng.uniform(-15, 15))) @ axis


def simulate_fracture(
    ct: CTVolume, label: int, rng: np.random.Generator, beam: tuple[float, float, float] | None = None
) -> Fracture:
    """Break bone ``label`` at a random elongated spot; raise :class:`SynthError` when it has none.

    With ``beam`` (the view's ray direction, (z, y, x)), the cut plane is chosen nearly parallel to the rays and
    the fragment moves mostly across them, where the bone allows (else as without a beam).
    """
    voxels = ct.voxels(label)
    if len(voxels) == 0:
        raise SynthError(f"label {label} is not in the volume")
    points = voxels.numpy().astype(np.float64)
    mm = ct.spacing
    radius = NEIGHBOURHOOD_MM.get(ct.bone_class(label) or "", 12.0)
    ray = None if beam is None else np.asarray(beam, dtype=np.float64)
    for attempt in range(60):
        centre = points[rng.integers(len(points))]
        found = _local_axis(points, centre, radius / mm)
        if found is None or found[1] <= 2.0:
            continue
        axis = found[0]
        normal = _cut_normal(axis, rng)
        if ray is None or abs(normal @ ray) <= ACROSS_BEAM or attempt >= 40:
            break  # after 40 tries, any elongated spot: a bone the view sees end-on still breaks
    else:
        # A bone the CT shows only in part (the humeral head and neck of a chest CT): break it across the
        # principal axis of what is there.
        centre = points[rng.integers(len(points))]
        _values, vectors = np.linalg.eigh(np.cov((points - points.mean(axis=0)).T))
        axis = vectors[:, -1]
        normal = _cut_normal(axis, rng)
    half = round(HALF_BOX_MM / mm)
    lo = np.maximum(np.round(centre).astype(int) - half, 0)
    hi = np.minimum(np.round(centre).astype(int) + half + 1, np.array(ct.shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    bone = ct.bone[box] * (ct.labels[box] == label)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1)
    rel = (grid - centre) * mm  # mm from the fracture centre, (z, y, x)
    along = rel @ normal
    lateral = np.linalg.norm(rel - np.outer(rel.reshape(-1, 3) @ axis, axis).reshape(rel.shape), axis=-1)

    gap = rng.uniform(1.0, 3.0)
    shift = rng.uniform(0.0, 4.0)
    angle = rng.uniform(0.0, 10.0)
    radius = 16.0 if ct.bone_class(label) == "humerus" else 12.0  # lateral reach of the break
    side = 1.0 if rng.random() < 0.5 else -1.0  # which end moves
    along = along * side
    reach = HALF_BOX_MM
    w_lat = np.clip((radius - lateral) / 4.0, 0.0, 1.0)
    w_ax = np.clip((0.9 * reach - along) / (0.45 * reach), 0.0, 1.0) * (along > gap / 2)
    weight = w_ax * w_lat

    direction = _random_unit(rng)
    if ray is not None:
        direction -= (direction @ ray) * ray * 0.8  # mostly across the rays: a step-off the view shows
    direction -= (direction @ normal) * normal * 0.7  # mostly sideways to the bone
    translation = shift * direction / np.linalg.norm(direction)
    rotation = _rotation(np.cross(normal, _random_unit(rng)), math.radians(angle)) - np.eye(3)
    displacement = weight[..., None] * (rel @ rotation.T + translation)  # mm
    comminuted = bool(rng.random() < 0.25)
    in_gap = (np.abs(along) <= gap / 2) & (w_lat > 0)
    site = np.abs(along) <= gap / 2 + SITE_MM
    if comminuted:
        second = gap / 2 + rng.uniform(3.0, 6.0)
        site |= (along > 0) & (along <= second + SITE_MM)
        chip = (along > gap / 2) & (along < second) & (w_lat > 0)
        displacement += chip[..., None] * (1.5 * _random_unit(rng))
        in_gap |= (np.abs(along - second) <= 0.5) & (w_lat > 0)
    source = grid - displacement / mm  # where each voxel's new content comes from (inverse warp), voxels
    size = np.array(bone.shape)
    normalised = 2.0 * (source - lo) / np.maximum(size - 1, 1) - 1.0
    sample_at = torch.from_numpy(normalised[..., ::-1].copy()).float()[None]  # grid_sample wants (x, y, z)
    moved = F.grid_sample(bone[None, None].float(), sample_at, align_corners=True, padding_mode="zeros")[0, 0]
    new_bone = torch.where(torch.from_numpy(in_gap), torch.zeros_like(bone), moved)
    delta = (new_bone - bone).contiguous()
    site_change = (delta.abs() * torch.from_numpy(site & (w_lat > 0))).contiguous()
    name = ct.names.get(label, str(label))
    return Fracture(
        delta=delta,
        origin=(int(lo[0]), int(lo[1]), int(lo[2])),
        centre=(float(centre[0]), float(centre[1]), float(centre[2])),
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        site=site_change,
        label=label,
        bone=name,
        bone_class=ct.bone_class(label) or "other",
        gap_mm=round(gap, 2),
        shift_mm=round(shift, 2),
        angle_deg=round(angle, 2),
        comminuted=comminuted,
    )
