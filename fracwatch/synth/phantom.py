"""2-D procedural limb phantoms with and without simulated fractures (for tests and the bootstrap model).

Each image is a projection through a soft-tissue cylinder holding one or two long bones (cortical shell and
marrow, optionally meeting at a joint). A fracture cuts one bone obliquely, opens a gap and may shift and
angulate the distal fragment, or split off a small fragment. Values are line integrals of attenuation:
bright = dense, like a MONOCHROME2 radiograph after its VOI LUT. Deterministic for a given seed.

This is *not* anatomy: it exists so that the pipeline, training code and tests have labelled data without a
download. The model lifecycle issue renders realistic training data from a real CT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

GAP_PX = (8.0, 14.0)  # fracture gap, pixels of the rendered image
SHIFT = (0.4, 0.8)  # lateral displacement of the distal fragment, fraction of the bone radius
JOINT_PROBABILITY = 0.15  # images that show a joint (a natural gap across the bone) — in both classes


@dataclass(frozen=True)
class Phantom:
    """One rendered phantom."""

    image: np.ndarray  # (rows, columns) float32, bright = dense
    fractured: bool
    bbox: tuple[int, int, int, int] | None  # x0, y0, x1, y1 of the fracture, pixels
    bones: int


def _chord(radius: np.ndarray | float, offset: np.ndarray) -> np.ndarray:
    """Path length through a circle of ``radius`` at distance ``offset`` from its centre."""
    return 2.0 * np.sqrt(np.clip(np.square(radius) - np.square(offset), 0.0, None))


def _bone(u: np.ndarray, v: np.ndarray, radius: float, start: float, end: float) -> np.ndarray:
    """Attenuation path through a tubular bone along u in [start, end] with rounded, flared ends."""
    length = end - start
    pos = (u - start) / max(length, 1.0)
    flare = 1.0 + 0.35 * (np.exp(-np.square(pos / 0.12)) + np.exp(-np.square((1 - pos) / 0.12)))
    r_out = radius * flare
    # rounded end caps: the radius shrinks to zero over half a radius beyond each end
    beyond = 2.0 * (np.maximum(start - u, 0.0) + np.maximum(u - end, 0.0))
    r_out = np.sqrt(np.clip(np.square(r_out) - np.square(beyond), 0.0, None))
    r_in = 0.6 * r_out
    cortex = _chord(r_out, v) - _chord(r_in, v)
    marrow = _chord(r_in, v)
    return 4.0 * cortex + 1.6 * marrow


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return image
    radius = int(np.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * np.square(x / sigma))
    kernel /= kernel.sum()
    tensor = torch.from_numpy(image)[None, None]
    k = torch.from_numpy(kernel)
    tensor = F.conv2d(F.pad(tensor, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    tensor = F.conv2d(F.pad(tensor, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return tensor[0, 0].numpy()


def render_phantom(seed: int, fractured: bool, size: tuple[int, int] | None = None) -> Phantom:
    """Render one phantom; the same (seed, fractured, size) always gives the same image."""
    rng = np.random.default_rng(seed)
    rows, cols = size or (int(rng.integers(256, 385)), int(rng.integers(256, 385)))
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    theta = rng.uniform(-0.5, 0.5) + (np.pi / 2 if rng.random() < 0.3 else 0.0)
    cy, cx = rows / 2 + rng.uniform(-0.1, 0.1) * rows, cols / 2 + rng.uniform(-0.1, 0.1) * cols
    u = (y - cy) * np.cos(theta) + (x - cx) * np.sin(theta)  # along the limb
    v = -(y - cy) * np.sin(theta) + (x - cx) * np.cos(theta)  # across the limb
    extent = max(rows, cols)
    limb_radius = rng.uniform(0.22, 0.34) * min(rows, cols)
    image = 1.0 * _chord(limb_radius, v)

    bones = 1 if rng.random() < 0.5 else 2
    radius = limb_radius * rng.uniform(0.18, 0.28)
    offsets = [0.0] if bones == 1 else [-radius * rng.uniform(1.2, 1.6), radius * rng.uniform(1.2, 1.6)]
    joint = rng.random() < JOINT_PROBABILITY
    joint_at = rng.uniform(-0.15, 0.15) * extent
    half_gap = rng.uniform(0.08, 0.2) * radius + 0.6 * radius  # visible joint space + the two end caps
    segments = [(-extent, joint_at - half_gap), (joint_at + half_gap, extent)] if joint else [(-extent, extent)]

    fracture_bone = int(rng.integers(bones)) if fractured else -1
    centre = rng.uniform(-0.3, 0.3) * extent
    if joint and abs(centre - joint_at) < 3 * radius:  # keep the fracture on the shaft, off the joint
        centre = joint_at + np.copysign(3 * radius + rng.uniform(0, 0.1) * extent, centre - joint_at)
    bbox: tuple[int, int, int, int] | None = None
    for index, offset in enumerate(offsets):
        vb = v - offset
        for start, end in segments:
            if index != fracture_bone or not start + radius < centre < end - radius:
                image += _bone(u, vb, radius, start, end)
                continue
            # the fracture: an oblique cut across the shaft, a gap, a shifted and angulated distal fragment
            tilt = np.tan(rng.uniform(-0.5, 0.5))
            gap = rng.uniform(*GAP_PX)
            shift = rng.uniform(*SHIFT) * radius
            angle = rng.uniform(-0.12, 0.12)
            cut = u - centre - tilt * vb
            du, dv = u - centre, vb
            ru = du * np.cos(angle) - dv * np.sin(angle) + centre
            rv = du * np.sin(angle) + dv * np.cos(angle) - shift
            proximal_part = np.where(cut < -gap / 2, _bone(u, vb, radius, start, end), 0.0)
            distal_part = np.where(cut > gap / 2, _bone(ru, rv, radius, start, end), 0.0)
            if rng.random() < 0.25:  # comminution: a wedge fragment near the cut is lost from view
                wedge = (cut > 0) & (cut < gap / 2 + radius * 0.8) & (vb > radius * 0.2)
                distal_part = np.where(wedge, 0.4 * distal_part, distal_part)
            image += proximal_part + distal_part
            inside = (np.abs(cut) < gap + 2) & (np.abs(vb) < radius * 1.3)
            ys, xs = np.nonzero(inside)
            if len(xs):
                margin = int(radius * 0.5) + 2
                bbox = (
                    max(0, int(xs.min()) - margin),
                    max(0, int(ys.min()) - margin),
                    min(cols - 1, int(xs.max()) + margin),
                    min(rows - 1, int(ys.max()) + margin),
                )

    # confounders in every class: a skin fold and a faint linear artefact
    if rng.random() < 0.5:
        fold = np.exp(-np.square((v - rng.uniform(-1, 1) * limb_radius) / rng.uniform(1.0, 3.0)))
        image += rng.uniform(2, 8) * fold.astype(np.float32)
    image = image.astype(np.float32)
    image = _blur(image, float(rng.uniform(0.3, 1.4)))
    scale = float(image.max()) or 1.0
    image = image / scale
    noise = rng.normal(0.0, rng.uniform(0.005, 0.03), size=image.shape).astype(np.float32)
    image = image + noise * np.sqrt(np.clip(image, 0.05, None))
    gamma = rng.uniform(0.7, 1.4)
    image = np.power(np.clip(image, 0.0, None), gamma).astype(np.float32)
    return Phantom(image=image, fractured=bool(fractured and bbox is not None), bbox=bbox, bones=bones)


def to_stored(image: np.ndarray, bits: int = 12) -> np.ndarray:
    """Scale a phantom to unsigned stored values of ``bits`` bits (MONOCHROME2)."""
    top = 2**bits - 1
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / max(high - low, 1e-6)
    return np.clip(np.rint(scaled * top), 0, top).astype(np.uint16)
