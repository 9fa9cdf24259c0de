"""Area downsampling by an integer factor (a leaf helper shared by pixel decoding and the transforms)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def downsample_factor(shape: tuple[int, ...], target_longest: int) -> int:
    """The largest integer factor that keeps the longest side of ``shape`` (last two axes) ≥ ``target_longest``."""
    return max(1, int(max(shape[-2:]) // max(1, target_longest)))


def block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` × ``factor`` blocks of the last two axes of a (C, H, W) float32 array.

    Uses torch's average pooling, multi-threaded and faster than numpy's reshape-mean. Edge rows and columns that
    do not fill a block are dropped.
    """
    if factor <= 1:
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    pooled = F.avg_pool2d(tensor.unsqueeze(0), kernel_size=factor, stride=factor).squeeze(0)
    return pooled.numpy()
