"""The percentile window: MONAI's ScaleIntensityRangePercentiles to the bit, its percentiles found by selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose, ScaleIntensityRangePercentiles

from fracwatch.pipeline.transforms import PercentileWindow, PreprocessConfig, inference_transforms, quantiles
from fracwatch.synth.phantom import render_phantom


def arrays() -> list[np.ndarray]:
    """Inputs the window meets: float pixels of odd and even sizes (fractional and whole ranks), a 12-bit detector's
    integers with many ties, a flat image, an image flat but for a few outliers, a phantom radiograph."""
    rng = np.random.default_rng(5)
    return [
        rng.normal(1000.0, 300.0, (1, 256, 256)).astype(np.float32),
        rng.random((1, 201, 137)).astype(np.float32),
        rng.integers(0, 4096, (1, 256, 180)).astype(np.float32),
        np.full((1, 64, 64), 7.0, dtype=np.float32),
        np.where(rng.random((1, 64, 64)) < 0.002, 5000.0, 100.0).astype(np.float32),
        render_phantom(11, True).image.astype(np.float32)[np.newaxis],
    ]


@pytest.mark.parametrize("index", range(6))
def test_the_window_is_monais_to_the_bit(index: int) -> None:
    image = arrays()[index]
    config = PreprocessConfig()
    monai = ScaleIntensityRangePercentiles(
        lower=config.percentile_low, upper=config.percentile_high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32
    )
    got = np.asarray(PercentileWindow(config)(image))
    assert got.dtype == np.float32 and got.shape == image.shape
    if index in (3, 4):  # both percentiles equal: MONAI returns the image less that value, unclipped; we, zeros
        with pytest.warns(Warning, match="Divide by zero"):
            assert np.asarray(monai(image)).max() == (0.0 if index == 3 else 4900.0)
        assert not got.any()
    else:
        assert np.array_equal(np.asarray(monai(image)), got)
    flat = torch.from_numpy(image)
    for percents in ((0.5, 99.5), (0.0, 100.0), (2.0, 50.0, 98.0)):
        wanted = torch.quantile(flat.reshape(-1), torch.tensor([p / 100.0 for p in percents]))
        assert torch.equal(quantiles(flat, percents), wanted), percents


def test_network_inputs_are_what_monais_window_made() -> None:
    """The whole preprocessing with the window swapped back for MONAI's gives the same inputs, bit for bit."""
    config = PreprocessConfig(input_size=128)
    ours = inference_transforms(config)
    monais = ScaleIntensityRangePercentiles(
        lower=config.percentile_low, upper=config.percentile_high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32
    )
    theirs = Compose([monais if isinstance(t, PercentileWindow) else t for t in ours.transforms])
    assert any(isinstance(t, PercentileWindow) for t in ours.transforms)
    for seed in range(4):
        image = render_phantom(seed, seed % 2 == 1).image.astype(np.float32)[np.newaxis]
        assert np.array_equal(np.asarray(ours(image)), np.asarray(theirs(image)))
