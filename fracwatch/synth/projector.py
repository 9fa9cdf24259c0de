"""Parallel-beam digitally reconstructed radiographs of a CT volume, by blocks.

A pose is a yaw (rotation about the patient's long axis: AP, PA, obliques) and a tilt (cranio-caudal
angulation). The projection is computed in two resampling steps on the isotropic volume (``(Z, Y, X)``, index
units): each axial slice is rotated by the yaw, then rays tilted by the tilt angle are summed through the
rotated volume (a shear along Z, exact for parallel rays). Every sample position is a function of the *global*
output index only, so any box of the volume can be projected on its own and lands exactly where, and exactly
as, it would in the projection of the whole volume: a fractured image is the normal image plus the projection
of the small local change — same grid, same interpolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Pose:
    """Yaw about the long (Z) axis and tilt about the left-right (X) axis, radians."""

    yaw: float
    tilt: float


@dataclass(frozen=True)
class Block:
    """A projected block: ``image`` (rows = Z after the shear, columns = rotated X) and its global origin."""

    image: torch.Tensor  # (rows, cols), line integrals in voxel-length units
    row0: int
    col0: int


def _normalise(index: torch.Tensor, size: int) -> torch.Tensor:
    return 2.0 * index / max(size - 1, 1) - 1.0


class Projector:
    """Projects blocks of a volume of shape ``shape`` (Z, Y, X) at one pose."""

    def __init__(self, shape: tuple[int, int, int], pose: Pose) -> None:
        self.shape = shape
        self.pose = pose
        _z, y, x = shape
        self.centre = ((x - 1) / 2.0, (y - 1) / 2.0)
        self._cos, self._sin = math.cos(pose.yaw), math.sin(pose.yaw)
        self._shear = math.tan(pose.tilt)
        self._scale = 1.0 / math.cos(pose.tilt)

    # --- yaw: output (y', x') -> input (y, x) ---------------------------------------------------------

    def _to_input(self, xr: torch.Tensor, yr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cx, cy = self.centre
        dx, dy = xr - cx, yr - cy
        return cx + self._cos * dx - self._sin * dy, cy + self._sin * dx + self._cos * dy

    def _rotated_range(self, x0: int, x1: int, y0: int, y1: int) -> tuple[int, int, int, int]:
        """The output (x', y') box that covers the input box [x0, x1) × [y0, y1) after the yaw."""
        cx, cy = self.centre
        corners = [(x, y) for x in (x0 - 1, x1) for y in (y0 - 1, y1)]
        xs, ys = [], []
        for x, y in corners:
            dx, dy = x - cx, y - cy
            xs.append(cx + self._cos * dx + self._sin * dy)
            ys.append(cy - self._sin * dx + self._cos * dy)
        return math.floor(min(xs)) - 1, math.ceil(max(xs)) + 2, math.floor(min(ys)) - 1, math.ceil(max(ys)) + 2

    @property
    def beam(self) -> tuple[float, float, float]:
        """The rays' unit direction (z, y, x) in volume index units: what ``locate`` maps to one point."""
        z, y, x = self._shear, self._cos, -self._sin
        norm = math.sqrt(z * z + y * y + x * x)
        return z / norm, y / norm, x / norm

    def locate(self, z: float, y: float, x: float) -> tuple[float, float]:
        """The global (row, column) where the ray through volume point (z, y, x) meets the detector."""
        cx, cy = self.centre
        dx, dy = x - cx, y - cy
        xr = cx + self._cos * dx + self._sin * dy
        yr = cy - self._sin * dx + self._cos * dy
        return z - (yr - cy) * self._shear, xr

    def project(self, block: torch.Tensor, origin: tuple[int, int, int]) -> Block:
        """Line integrals of ``block`` (a box of the volume at ``origin`` = (z, y, x)), at this pose."""
        oz, oy, ox = origin
        sz, sy, sx = block.shape
        # 1. yaw: rotate each axial slice of the block onto the global rotated grid
        xa, xb, ya, yb = self._rotated_range(ox, ox + sx, oy, oy + sy)
        yr, xr = torch.meshgrid(
            torch.arange(ya, yb, dtype=torch.float32), torch.arange(xa, xb, dtype=torch.float32), indexing="ij"
        )
        xi, yi = self._to_input(xr, yr)
        grid = torch.stack([_normalise(xi - ox, sx), _normalise(yi - oy, sy)], dim=-1)
        rotated = F.grid_sample(
            block[:, None].float(), grid.expand(sz, *grid.shape), align_corners=True, padding_mode="zeros"
        )[:, 0]  # (sz, ny, nx) at global rows ya.., cols xa..
        # 2. tilt: sum along y' the samples at z = z0 + (y' - cy) * shear (parallel rays)
        cy = self.centre[1]
        ny, nx = rotated.shape[1], rotated.shape[2]
        offsets = (torch.arange(ya, yb, dtype=torch.float32) - cy) * self._shear
        za = math.floor(oz - max(offsets.max().item(), 0.0)) - 1
        zb = math.ceil(oz + sz - 1 - min(offsets.min().item(), 0.0)) + 2
        z0 = torch.arange(za, zb, dtype=torch.float32)
        zs = z0[:, None] + offsets[None, :]  # (nz0, ny): global z sampled for each output row and y'
        planes = rotated.permute(2, 0, 1)[:, None]  # (nx, 1, sz, ny)
        yy = torch.arange(ny, dtype=torch.float32).expand(len(z0), ny)
        grid2 = torch.stack([_normalise(yy, ny), _normalise(zs - oz, sz)], dim=-1)
        sheared = F.grid_sample(planes, grid2.expand(nx, *grid2.shape), align_corners=True, padding_mode="zeros")
        image = sheared[:, 0].sum(dim=2).T * self._scale  # (nz0, nx)
        return Block(image=image, row0=za, col0=xa)

    def project_volume(self, volume: torch.Tensor) -> Block:
        """The whole volume's projection."""
        return self.project(volume, (0, 0, 0))


def overlap(
    shape: tuple[int, int], origin: tuple[int, int], block: Block
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Where ``block`` meets a canvas of ``shape`` whose element [0, 0] is global (row0, col0) = ``origin``: the
    (rows, cols) slices of the canvas and of the block, or None when they do not meet."""
    r0, c0 = block.row0 - origin[0], block.col0 - origin[1]
    rows, cols = block.image.shape
    ra, ca = max(r0, 0), max(c0, 0)
    rb, cb = min(r0 + rows, shape[0]), min(c0 + cols, shape[1])
    if ra >= rb or ca >= cb:
        return None
    return (slice(ra, rb), slice(ca, cb)), (slice(ra - r0, rb - r0), slice(ca - c0, cb - c0))


def paste(canvas: torch.Tensor, block: Block, origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``canvas`` (whose element [0, 0] is global (row0, col0) = ``origin``) plus ``block`` where they overlap."""
    out = canvas.clone()
    where = overlap((out.shape[0], out.shape[1]), origin, block)
    if where is not None:
        out[where[0]] += block.image[where[1]]
    return out
