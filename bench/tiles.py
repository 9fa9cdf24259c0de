"""What tiles at a pixel spacing cost: a whole-chest DICOM image scored as one whole-image input (the baseline)
against its tiles at the bundle's ``tile_spacing_mm``.

    python bench/tiles.py [--model models/fracwatch-drr] [--rows 3000 --columns 2500 --spacing 0.15] [--repeat 5]

Writes a DX image of that size and Imager Pixel Spacing with ``fracwatch synth``'s DICOM writer (smooth noise:
the content does not change the time), then times ``load_dicom`` (decode, LUTs, downsample, preprocess) and the
network through the daemon's own Predictor, both ways, best of ``--repeat``; prints the tile count, each time and
the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread

from fracwatch.model.bundle import load_bundle
from fracwatch.model.predictor import Predictor
from fracwatch.service.scoring import load_dicom, score_loaded
from fracwatch.synth.dicomio import write_dx


def radiograph(folder: Path, rows: int, columns: int, spacing: float) -> Dataset:
    """A DX image written by ``fracwatch synth``'s own DICOM writer (smooth noise: content does not change the
    time), read back."""
    rng = np.random.default_rng(0)
    coarse = rng.random((rows // 50 + 2, columns // 50 + 2))
    pixels = np.kron(coarse, np.ones((50, 50)))[:rows, :columns] * 3000 + rng.normal(0, 30, (rows, columns))
    record = {"pose": 0, "index": 0, "bone_class": "rib", "view": "AP", "pixel_spacing_mm": spacing}
    written = write_dx(folder, "bench", np.clip(pixels, 0, 4095).astype(np.uint16), "MONOCHROME2", record, seed=0)
    return dcmread(folder.parent / written["dicom"])


def best(repeat: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=Path("models/fracwatch-drr"))
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--columns", type=int, default=2500)
    parser.add_argument("--spacing", type=float, default=0.15)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    tiled = bundle.preprocess_config
    if tiled.tile_spacing_mm is None:
        raise SystemExit(f"{args.model} does not tile (no preprocessing.tile_spacing_mm in its card)")
    whole = dataclasses.replace(tiled, tile_spacing_mm=None)
    with tempfile.TemporaryDirectory() as scratch:
        ds = radiograph(Path(scratch) / "dicom", args.rows, args.columns, args.spacing)
    predictor = Predictor(bundle.network, "auto")
    results = {}
    for name, config in (("whole", whole), ("tiled", tiled)):
        loaded = load_dicom(ds, config)
        score_loaded([loaded], predictor, config)  # warm-up
        load_s = best(args.repeat, lambda config=config: load_dicom(ds, config))
        score_s = best(args.repeat, lambda loaded=loaded, config=config: score_loaded([loaded], predictor, config))
        results[name] = (len(loaded.inputs), load_s, score_s)
        print(f"{name}: {len(loaded.inputs)} input(s); load {load_s * 1000:6.1f} ms, network {score_s * 1000:6.1f} ms")
    ratio = sum(results["tiled"][1:]) / sum(results["whole"][1:])
    print(f"tiled / whole: {ratio:.2f}x the time per image ({args.rows} x {args.columns} at {args.spacing} mm)")


if __name__ == "__main__":
    main()
