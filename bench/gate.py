"""The out-of-scope gate's false-skip rate on radiographs and catch rate on generated non-radiographs.

    python bench/gate.py [--count 100] [--model models/fracwatch-drr]

Radiographs: the procedural phantoms (``--count`` seeds, fractured and not), pydicom's real CRs (RG1 chest,
RG3 tibia; uncompressed and JPEG 2000) and uniform-noise test images. Non-radiographs, ``--count`` of each
kind with seeded variations: SMPTE bars with sensor noise of 0-8 grey levels, text pages, gradients and
checkerboards with noise, blank frames with noise, colour pictures, and CT-like axial slices (a disc of soft
tissue with bone and air inside a black field). Prints one line per kind: how many the gate let through.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fracwatch.model.bundle import read_card
from fracwatch.pipeline.gate import GateRules, colour_reason, out_of_scope
from fracwatch.pipeline.pictures import colourfulness
from fracwatch.synth.phantom import render_phantom
from tests import patterns

MODEL = Path(__file__).resolve().parents[1] / "models" / "fracwatch-drr"


def radiographs(count: int) -> Iterator[tuple[str, np.ndarray]]:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    for seed in range(count):
        yield "phantom", render_phantom(seed, seed % 2 == 0).image
    for name in ("RG1_UNCI.dcm", "RG3_UNCI.dcm", "RG1_J2KI.dcm", "RG3_J2KI.dcm", "RG1_J2KR.dcm", "RG3_J2KR.dcm"):
        path = get_testdata_file(name)
        if path is not None:
            yield "real CR", dcmread(path).pixel_array
    for seed in range(count):
        yield "noise image", np.random.default_rng(seed).integers(0, 4096, (128, 96))


def _ct_slice(rng: np.random.Generator) -> np.ndarray:
    size = 512
    y, x = np.mgrid[0:size, 0:size] - size / 2
    radius = rng.uniform(180, 240)
    image = np.full((size, size), -1000.0)
    body = (x / radius) ** 2 + (y / (radius * rng.uniform(0.7, 0.95))) ** 2 < 1
    image[body] = 40 + rng.normal(0, 15, body.sum())
    for _ in range(rng.integers(2, 6)):  # bones and air pockets
        cy, cx, r = rng.uniform(-120, 120), rng.uniform(-150, 150), rng.uniform(10, 40)
        image[((x - cx) ** 2 + (y - cy) ** 2 < r**2) & body] = rng.choice([700.0, -800.0])
    return image


def non_radiographs(count: int, work: Path, rules: GateRules) -> Iterator[tuple[str, Callable[[], str | None]]]:
    for seed in range(count):
        rng = np.random.default_rng(seed)
        noise = float(rng.uniform(0, 8))
        yield "smpte bars", _frame(patterns.smpte_bars(noise=noise, seed=seed), rules)
        yield "text page", _frame(patterns.document(seed) + rng.normal(0, rng.uniform(0, 4), (1100, 850)), rules)
        yield "gradient", _frame(patterns.gradient() + rng.normal(0, noise, (480, 640)), rules)
        yield "checkerboard", _frame(patterns.checkerboard() + rng.normal(0, noise, (480, 640)), rules)
        yield "blank", _frame(patterns.blank() + rng.normal(0, noise, (400, 400)), rules)
        yield "CT-like slice", _frame(_ct_slice(rng), rules)
        path = patterns.colour_photo(work / f"photo{seed}.png", seed)
        yield "colour picture", lambda path=path: colour_reason(colourfulness(path), rules)


def _frame(frame: np.ndarray, rules: GateRules) -> Callable[[], str | None]:
    return lambda: out_of_scope(frame, rules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--model", type=Path, default=MODEL)
    args = parser.parse_args()
    rules = read_card(args.model).scope.rules()
    print(f"gate rules {rules}")
    passed: dict[str, list[bool]] = {}
    for kind, frame in radiographs(args.count):
        passed.setdefault(kind, []).append(out_of_scope(frame, rules) is None)
    print("radiographs (false skips):")
    for kind, outcomes in passed.items():
        print(f"  {kind:<16} {outcomes.count(False):4d} of {len(outcomes)} skipped")
    caught: dict[str, list[bool]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, decide in non_radiographs(args.count, Path(tmp), rules):
            caught.setdefault(kind, []).append(decide() is not None)
    print("non-radiographs (catch rate):")
    for kind, outcomes in caught.items():
        print(f"  {kind:<16} {outcomes.count(True):4d} of {len(outcomes)} skipped")


if __name__ == "__main__":
    main()
