"""Scoring throughput and AUROC of every runtime of a bundle against torch eager NCHW float32, in one run.

    python bench/runtimes.py --data data/synth [--model models/fracwatch-drr] [--split test] [--repeats 2]

The test split's images go through the daemon's preprocessing once (whole chests as their tiles, as the daemon
scores them); then each runtime scores every input — tiles included — ``--repeats`` times, and the bench prints
images/s, inputs/s, the ratio to torch eager NCHW (the network called as it is: float32, default memory format),
the image-level AUROC and the largest image probability difference from that reference. Runtimes: torch
channels_last (the daemon's torch path), and those the bundle's card records (``fracwatch export-runtime``),
whether they passed their gate or not where their file is there. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fracwatch.config import load_settings
from fracwatch.lab.datasets import load_inputs, read_dataset
from fracwatch.model import runtimes
from fracwatch.model.bundle import load_bundle
from fracwatch.model.metrics import auroc
from fracwatch.model.predictor import TorchRuntime, describe_device, fracture_probability
from fracwatch.model.scores import image_probabilities


class EagerNCHW:
    """The reference: ``network(x)``, float32, NCHW, inference_mode."""

    name = "torch eager NCHW"

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network.eval()

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.network(batch).float()


def score(runtime: object, images: torch.Tensor, batch: int) -> tuple[np.ndarray, float]:
    """Per-input probabilities and the seconds they took (inputs converted to float32 outside the clock)."""
    chunks = [images[s : s + batch].to(torch.float32) for s in range(0, len(images), batch)]
    runtime.logits(chunks[0])  # type: ignore[attr-defined]  # warm-up
    started = time.perf_counter()
    out = [fracture_probability(runtime.logits(c)).numpy() for c in chunks]  # type: ignore[attr-defined]
    return np.concatenate(out), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True, help="A labelled data set with a test split.")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    bundle = load_bundle(args.model or load_settings().model_path)
    config = bundle.preprocess_config
    items = [i for i in read_dataset(args.data) if i.split == args.split]
    loaded = load_inputs(items, config)
    labels = np.array([i.label for i in items])
    threads = torch.get_num_threads()
    cpu = torch.device("cpu")
    candidates: list[object] = [EagerNCHW(bundle.network), TorchRuntime(bundle.network, cpu)]
    for name, gate in bundle.card.runtimes.items():
        if name == runtimes.TORCH_BF16:
            candidates.append(TorchRuntime(bundle.network, cpu, torch.bfloat16))
        elif gate.file is not None:
            candidates.append(runtimes.OnnxRuntime(name, bundle.path / gate.file, threads))
    print(f"{bundle.card.name} {bundle.card.version}: {len(items)} {args.split} images, {len(loaded.images)} inputs "
          f"(tiles included); {describe_device(cpu)}")  # fmt: skip
    reference: np.ndarray | None = None
    base = 0.0
    for runtime in candidates:
        seconds = min(score(runtime, loaded.images, args.batch)[1] for _ in range(args.repeats))
        per_input, _ = score(runtime, loaded.images, args.batch)
        probabilities = image_probabilities(per_input, loaded.owners, config.tile_count_correction)[0]
        reference = probabilities if reference is None else reference
        base = base or len(items) / seconds
        rate = len(items) / seconds
        name = runtime.name  # type: ignore[attr-defined]
        print(
            f"{name:>17}: {rate:7.1f} images/s ({len(loaded.images) / seconds:7.1f} inputs/s), {rate / base:4.2f}x "
            f"eager NCHW; AUROC {auroc(labels, probabilities):.4f}, largest difference "
            f"{float(np.max(np.abs(probabilities - reference))):.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
