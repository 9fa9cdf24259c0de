"""Image loading for ``train``/``evaluate`` in this process against ``--workers N`` DataLoader processes.

    python bench/load_workers.py DATASET [--workers 2] [--images 400] [--input-size 256]

Loads the first ``--images`` images of a data set (a synth folder, class folders, a CSV ...) through the daemon's
pipeline twice — in this process (the baseline), then in N worker processes — checks the tensors are identical and
prints both times and their ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fracwatch.pipeline.transforms import PreprocessConfig
from fracwatch.service.datasets import load_tensors, read_dataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--input-size", type=int, default=256)
    args = parser.parse_args()
    items = read_dataset(args.dataset)[: args.images]
    config = PreprocessConfig(input_size=args.input_size)
    seconds, tensors = {}, {}
    for workers in (0, args.workers):
        started = time.monotonic()
        tensors[workers] = load_tensors(items, config, workers=workers)
        seconds[workers] = time.monotonic() - started
    for workers, taken in seconds.items():
        print(f"workers {workers}: {taken:6.1f} s for {len(items)} images ({len(items) / taken:5.1f} images/s)")
    same = torch.equal(tensors[0], tensors[args.workers])
    print(f"speed-up {seconds[0] / seconds[args.workers]:.2f}x with {args.workers} workers; identical tensors: {same}")


if __name__ == "__main__":
    main()
