"""Area downsampling: the strided block mean gives torch's average pooling's values, for integer and float
images, every factor, and sides that do not divide by it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fracwatch.resample import block_mean, downsample_factor


def reference(array: np.ndarray, factor: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return F.avg_pool2d(tensor.unsqueeze(0), kernel_size=factor, stride=factor).squeeze(0).numpy()


@pytest.mark.parametrize("factor", [2, 3, 4, 7])
@pytest.mark.parametrize("shape", [(1, 300, 250), (2, 97, 131)])
def test_a_block_mean_of_stored_integers_is_exactly_average_pooling(factor: int, shape: tuple[int, ...]) -> None:
    stored = np.random.default_rng(factor).integers(0, 4096, size=shape, dtype=np.uint16)
    out = block_mean(stored, factor)
    assert out.dtype == np.float32
    assert out.shape == (shape[0], shape[1] // factor, shape[2] // factor)  # edges that fill no block dropped
    np.testing.assert_array_equal(out, reference(stored, factor))


@pytest.mark.parametrize("factor", [2, 5])
def test_a_block_mean_of_floats_matches_average_pooling_to_rounding(factor: int) -> None:
    values = np.random.default_rng(1).normal(-1000.0, 300.0, size=(1, 123, 211)).astype(np.float32)
    np.testing.assert_allclose(block_mean(values, factor), reference(values, factor), rtol=1e-6, atol=1e-3)


def test_a_factor_of_one_returns_the_image_as_float32() -> None:
    stored = np.arange(12, dtype=np.uint16).reshape(1, 3, 4)
    out = block_mean(stored, 1)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, stored)


def test_the_factor_keeps_the_longest_side_at_least_the_target() -> None:
    assert downsample_factor((3000, 2500), 1236) == 2
    assert downsample_factor((1, 3000, 2500), 700) == 4
    assert downsample_factor((512, 512), 1024) == 1
