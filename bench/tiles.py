"""What tiles at a pixel spacing cost: a whole-chest DICOM image scored as one whole-image input (the baseline)
against its tiles at the bundle's ``tile_spacing_mm``.

    python bench/tiles.py [--model models/fracwatch-drr] [--rows 3000 --columns 2500 --spacing 0.15] [--repeat 5]

Builds a DX image of that size and Imager Pixel Spacing (smooth noise: the content does not change the time),
then times ``load_dicom`` (decode, LUTs, downsample, preprocess) and the network through the daemon's own
Predictor, both ways, best of ``--repeat``; prints the tile count, each time and the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fracwatch.model.bundle import load_bundle
from fracwatch.model.predictor import Predictor
from fracwatch.service.scoring import load_dicom, score_loaded


def radiograph(rows: int, columns: int, spacing: float) -> Dataset:
    rng = np.random.default_rng(0)
    coarse = rng.random((rows // 50 + 2, columns // 50 + 2))
    pixels = np.kron(coarse, np.ones((50, 50)))[:rows, :columns] * 3000 + rng.normal(0, 30, (rows, columns))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelData = np.clip(pixels, 0, 4095).astype(np.uint16).tobytes()
    return ds


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
    ds = radiograph(args.rows, args.columns, args.spacing)
    predictor = Predictor(bundle.network, "auto")
    results = {}
    for name, config in (("whole", whole), ("tiled", tiled)):
        loaded = load_dicom(ds, config)
        score_loaded([loaded], predictor)  # warm-up
        load_s = best(args.repeat, lambda config=config: load_dicom(ds, config))
        score_s = best(args.repeat, lambda loaded=loaded: score_loaded([loaded], predictor))
        results[name] = (len(loaded.inputs), load_s, score_s)
        print(f"{name}: {len(loaded.inputs)} input(s); load {load_s * 1000:6.1f} ms, network {score_s * 1000:6.1f} ms")
    ratio = sum(results["tiled"][1:]) / sum(results["whole"][1:])
    print(f"tiled / whole: {ratio:.2f}x the time per image ({args.rows} x {args.columns} at {args.spacing} mm)")


if __name__ == "__main__":
    main()
