"""Image loading for ``train``/``evaluate`` in this process against ``--workers N`` DataLoader processes.

    python bench/load_workers.py DATASET [--workers 2] [--images 400] [--input-size 256]

Loads the first ``--images`` images of a data set (a synth folder, class folders, a CSV ...) through the daemon's
pipeline twice — in this process (the baseline), then in N worker processes — checks the tensors are identical and
prints both times and their ratio, and this process's own CPU time: with workers it only receives and stacks the
tensors, and its CPU time per image bounds the rate any number of workers can reach.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fracwatch.lab.datasets import load_tensors, read_dataset
from fracwatch.pipeline.transforms import PreprocessConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--input-size", type=int, default=256)
    args = parser.parse_args()
    items = read_dataset(args.dataset)[: args.images]
    config = PreprocessConfig(input_size=args.input_size)
    load_tensors(items[:16], config)  # warm-up, untimed: the first images pay for imports and first calls
    seconds, own, tensors = {}, {}, {}
    for workers in (0, args.workers):
        started, cpu = time.monotonic(), time.process_time()
        tensors[workers] = load_tensors(items, config, workers=workers)
        seconds[workers], own[workers] = time.monotonic() - started, time.process_time() - cpu
    for workers, taken in seconds.items():
        print(
            f"workers {workers}: {taken:6.1f} s for {len(items)} images ({len(items) / taken:5.1f} images/s); "
            f"this process's CPU {own[workers]:.1f} s ({1000 * own[workers] / len(items):.1f} ms per image)"
        )
    # the workers decode and preprocess; this process receives and stacks: its CPU per image bounds what any
    # number of workers can reach
    ceiling = len(items) / own[args.workers] if own[args.workers] > 0 else float("inf")
    print(f"this process alone would allow at most {ceiling:.0f} images/s with workers")
    same = torch.equal(tensors[0], tensors[args.workers])
    print(f"speed-up {seconds[0] / seconds[args.workers]:.2f}x with {args.workers} workers; identical tensors: {same}")


if __name__ == "__main__":
    main()
