"""The out-of-scope gate on real radiographs (pydicom's RG1 chest and RG3 tibia CRs), the synthetic phantoms,
and on images that are not radiographs (test patterns, a text page, a gradient, a blank frame, colour)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from fracwatch.pipeline.gate import GateRules, colour_reason, measure, out_of_scope
from fracwatch.pipeline.pictures import colourfulness
from fracwatch.synth.phantom import render_phantom
from tests import patterns

RULES = GateRules()


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "RG3_UNCI.dcm"])
def test_real_radiographs_pass_the_gate_with_margin(name: str) -> None:
    frame = dcmread(get_testdata_file(name)).pixel_array
    assert out_of_scope(frame, RULES) is None
    figures = measure(frame)
    assert figures is not None
    assert figures.grey_levels >= 4 * RULES.min_grey_levels
    assert figures.dominant_share <= RULES.max_dominant_share / 1.7
    assert figures.pattern_residual >= 5 * RULES.min_pattern_residual


@pytest.mark.parametrize("seed", range(6))
def test_synthetic_radiographs_pass_the_gate(seed: int) -> None:
    assert out_of_scope(render_phantom(seed, seed % 2 == 0).image, RULES) is None


def test_noise_images_the_tests_send_pass_the_gate() -> None:
    noise = np.random.default_rng(3).integers(0, 4096, (128, 96))
    assert out_of_scope(noise, RULES) is None


@pytest.mark.parametrize("kind", sorted(patterns.NON_RADIOGRAPHS))
def test_non_radiographs_are_out_of_scope_with_a_reason(kind: str) -> None:
    reason = out_of_scope(patterns.NON_RADIOGRAPHS[kind](), RULES)
    assert reason is not None and reason.startswith("not a radiograph")


def test_a_colour_picture_is_out_of_scope_and_a_grey_one_is_not(tmp_path: Path) -> None:
    photo = patterns.colour_photo(tmp_path / "photo.png")
    image = render_phantom(1, True).image
    grey = patterns.save_png(image * 255 / image.max(), tmp_path / "grey.png")
    assert colour_reason(colourfulness(photo), RULES) is not None
    assert colourfulness(grey) == 0.0 and colour_reason(colourfulness(grey), RULES) is None
