"""Training-time augmentation on the batch's device, and the fractures' boxes as input-pixel masks."""

from __future__ import annotations

import torch
from monai.networks.layers import AffineTransform


class Augmentation:
    """Augmentation of a batch of preprocessed images, on whatever device the batch is on: small rotation and
    zoom, left-right mirror (mirrored anatomy is still anatomy; upside-down is not, so no vertical flip), gamma
    contrast, noise — the draws of MONAI's ``RandRotate(range_x=0.17, prob=0.5)``, ``RandZoom(0.9, 1.1,
    prob=0.5)``, ``RandFlip(prob=0.5, spatial_axis=1)``, ``RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5))`` and
    ``RandGaussianNoise(prob=0.3, std=0.03)``, applied to the whole batch at once (MONAI's
    ``AffineTransform`` layer), on the device the network trains on rather than image by image on the CPU
    (``bench/training_step.py``).

    Images of one group — twins, the same scene with and without the break — get one draw: the one difference
    the batch shows between them stays the fracture. Box masks move with their images and stay binary. Seeded;
    ``state``/``set_state`` carry the generator across a resumed run.
    """

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        # MONAI's batched affine resampler; theta in torch's normalised (x, y) convention
        self.warp = AffineTransform(normalized=True, reverse_indexing=False, align_corners=False, padding_mode="zeros")

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor | None = None, groups: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, 1, H, W) images, optional (N, 1, H, W) masks and groups of batch positions sharing one draw
        (default: each image its own) → augmented copies."""
        count = len(images)
        groups = groups if groups is not None else [[p] for p in range(count)]
        member = torch.empty(count, dtype=torch.long)
        for number, positions in enumerate(groups):
            member[positions] = number
        draws = torch.rand(len(groups), 9, generator=self.generator)[member]
        angle = torch.where(draws[:, 0] < 0.5, (2 * draws[:, 1] - 1) * 0.17, 0.0)
        zoom = torch.where(draws[:, 2] < 0.5, 0.9 + 0.2 * draws[:, 3], 1.0)
        mirror = torch.where(draws[:, 4] < 0.5, -1.0, 1.0)
        gamma = torch.where(draws[:, 5] < 0.5, 0.7 + 0.8 * draws[:, 6], 1.0)
        noise_std = torch.where(draws[:, 7] < 0.3, 0.03 * draws[:, 8], 0.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        zero = torch.zeros(count)
        # output (x, y) → input: rotate and scale about the centre, the x axis mirrored first (square inputs)
        theta = torch.stack([torch.stack([cos * mirror, -sin, zero], 1), torch.stack([sin * mirror, cos, zero], 1)], 1)
        device = images.device
        stacked = images.float() if masks is None else torch.cat([images.float(), masks.float()], dim=1)
        moved = self.warp(stacked, theta.to(device))
        shown = moved[:, :1].clamp(0.0, 1.0) ** gamma.to(device)[:, None, None, None]
        noise = torch.randn(images.shape, generator=self.generator) * noise_std[:, None, None, None]
        out = shown + noise.to(device)
        return out, None if masks is None else (moved[:, 1:] > 0.5).float()


def box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, S, S) masks: 1 inside each (x0, y0, x1, y1) box; all 0 for a NaN box."""
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = (boxes[:, k, None] for k in range(4))
    cols = (grid >= x0) & (grid <= x1)  # NaN compares False: no box, empty mask
    rows = (grid >= y0) & (grid <= y1)
    return (rows[:, :, None] & cols[:, None, :]).float()[:, None]
