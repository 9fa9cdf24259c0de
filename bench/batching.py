"""Scoring throughput with study versions batched together, as the daemon's scoring process does it.

    python bench/batching.py [--studies 16] [--rows 3000 --columns 2500] [--batches 1,4,8] [--device auto]

The same 2-image DX studies (whole chests at 0.15 mm: the bundle's tiles) through the scoring process's own code
— ``load_dicom`` per image, one ``score_loaded`` pass over a batch's images and tiles, an SR built and encoded per
study — in batches of each size given; prints images/s, seconds per batch (what the batch's first study waits
for its SR) and the ratio of images/s to batches of one, measured in this one run. No database and no network:
the part of the daemon that ``max_batch_studies`` changes. On a GPU (``--device cuda``) the network runs under
float16 autocast, as in the daemon.
"""

from __future__ import annotations

import argparse
import io
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from pydicom import Dataset

from fracwatch.config import load_settings
from fracwatch.model.bundle import Bundle, load_bundle
from fracwatch.model.predictor import Predictor
from fracwatch.model.runtimes import predictor_for
from fracwatch.report.sr import AlgorithmIdentity, ScoredImage, build_sr
from fracwatch.service.scoring import algorithm_identity, load_dicom, rehearsal_dataset, score_loaded


def studies(count: int, rows: int, columns: int) -> list[list[Dataset]]:
    """``count`` studies of two made-up DX images each (the scoring process's rehearsal image)."""
    image = rehearsal_dataset(rows, columns)
    return [[image, image] for _ in range(count)]


def run(batch: list[list[Dataset]], bundle: Bundle, predictor: Predictor, identity: AlgorithmIdentity) -> None:
    config = bundle.preprocess_config
    loaded = [[load_dicom(ds, config, bundle.scope) for ds in study] for study in batch]
    probabilities = score_loaded([image for study in loaded for image in study], predictor, config)
    cursor = 0
    for study in loaded:
        scored = probabilities[cursor : cursor + len(study)]
        cursor += len(study)
        top = max(p for p in scored if p is not None)
        images = [ScoredImage(image.header, p, bundle.category(p)) for image, p in zip(study, scored, strict=True)
                  if image.header is not None and p is not None]  # fmt: skip
        sr = build_sr(images, top, bundle.category(top), identity, datetime.now(UTC))
        sr.save_as(io.BytesIO(), enforce_file_format=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--columns", type=int, default=2500)
    parser.add_argument("--batches", default="1,4,8", help="studies per batch, comma-separated")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    settings = load_settings()
    bundle = load_bundle(args.model or settings.model_path)
    predictor = predictor_for(bundle, args.device, settings.torch_threads, settings.batch_size, settings.runtime)
    identity = algorithm_identity(bundle)
    work = studies(args.studies, args.rows, args.columns)
    run(work[:1], bundle, predictor, identity)  # first calls: the decoder's, the network's, highdicom's tables
    print(f"device {predictor.device}, {args.studies} studies of 2 x {args.rows} x {args.columns}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    baseline = None
    for size in (int(value) for value in args.batches.split(",")):
        started = time.perf_counter()
        batches = [work[start : start + size] for start in range(0, len(work), size)]
        for batch in batches:
            run(batch, bundle, predictor, identity)
        seconds = time.perf_counter() - started
        images_per_s = 2 * len(work) / seconds
        baseline = baseline or images_per_s
        print(f"batches of {size:>2}: {images_per_s:6.2f} images/s, {seconds / len(batches):.3f} s a batch, "
              f"{images_per_s / baseline:.2f}x batches of 1")  # fmt: skip


if __name__ == "__main__":
    main()
