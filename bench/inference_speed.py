"""Inference throughput of network presets and input sizes on this machine (CPU, or CUDA when present).

    python bench/inference_speed.py [--configs tiny-resnet-map:256,tiny-resnet-map:320,...] [--images 256]

Speed does not depend on the weights, so untrained networks are timed through the daemon's own Predictor
(batch 16, after a warm-up batch). Prints images/s, the ratio to the first configuration, parameters and the
size of the weights file. Accuracy per configuration needs training: bench/backbones.py.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import torch

from fracwatch.model.networks import PRESETS, build_network
from fracwatch.model.predictor import Predictor

DEFAULT = "tiny-resnet-map:256,tiny-resnet-map:320,tiny-resnet-map:384,small-resnet-map:256,resnet18:256"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default=DEFAULT)
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    rows = []
    for entry in args.configs.split(","):
        arch, size = entry.split(":")
        builder, params = PRESETS[arch]
        network = build_network(builder, params).eval()
        predictor = Predictor(network, "auto", batch_size=16)
        inputs = [torch.rand(1, int(size), int(size)) for _ in range(args.images)]
        predictor.predict(inputs[:16])  # warm-up
        started = time.monotonic()
        predictor.predict(inputs)
        buffer = io.BytesIO()
        torch.save(network.state_dict(), buffer)
        rows.append(
            {
                "arch": arch,
                "input_size": int(size),
                "images_per_second": args.images / (time.monotonic() - started),
                "parameters": sum(p.numel() for p in network.parameters()),
                "weights_mb": buffer.tell() / 1e6,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["images_per_second"]
    for row in rows:
        print(
            f"{row['arch']:>16} @ {row['input_size']}: {row['images_per_second']:6.1f} images/s "
            f"({row['images_per_second'] / base:.2f}x), {row['parameters'] / 1e6:.2f} M parameters, "
            f"{row['weights_mb']:.1f} MB"
        )


if __name__ == "__main__":
    main()
