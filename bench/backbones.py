"""AUROC against speed for a few backbones and input sizes on a synth data set (CPU or CUDA).

    python bench/backbones.py DATA_DIR [--epochs 8] [--configs tiny-resnet-map16:256:96,tiny-resnet-map:320,...]
        [--crop-epochs N]

A configuration is ARCH:INPUT_SIZE[:CROP] — with CROP, a logit-map network trains on crops that size (as
``fracwatch train --crop``; with ``--crop-epochs N``, N epochs of crops and the rest on whole images), twins
batched together as in ``fracwatch train``. Each configuration trains the same number of epochs on the train
split with early stopping on the val split and is scored on the test split; it prints test AUROC, training
seconds per epoch and inference images/s (batch 16, this machine), and the ratio of each configuration's
throughput to the first one's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fracwatch.lab.datasets import input_boxes, load_tensors, read_dataset, twin_partners
from fracwatch.model.metrics import auroc
from fracwatch.model.predictor import Predictor
from fracwatch.model.training import TrainConfig, train_network
from fracwatch.pipeline.transforms import PreprocessConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--configs", default="tiny-resnet-map16:256:96,tiny-resnet-map16:384:144,tiny-resnet-map:256:96"
    )
    parser.add_argument("--crop-epochs", type=int, default=None, help="with a CROP: epochs on crops, then whole images")
    parser.add_argument("--out", type=Path, default=Path("bench-backbones.json"))
    parser.add_argument("--max-train", type=int, default=0, help="use only the first N training images (0: all)")
    args = parser.parse_args()
    items = read_dataset(args.data)
    parts = {s: [i for i in items if i.split == s] for s in ("train", "val", "test")}
    if args.max_train:
        parts["train"] = parts["train"][: args.max_train]
    rows = []
    for entry in args.configs.split(","):
        arch, size, *crop = entry.split(":")
        preprocess = PreprocessConfig(input_size=int(size))
        tensors = {s: load_tensors(p, preprocess) for s, p in parts.items()}
        labels = {s: torch.tensor([float(i.label) for i in p]) for s, p in parts.items()}
        config = TrainConfig(
            arch=arch,
            input_size=int(size),
            epochs=args.epochs,
            batch_size=32,
            crop=int(crop[0]) if crop else None,
            crop_epochs=args.crop_epochs if crop else None,
        )
        started = time.monotonic()
        boxes = input_boxes(parts["train"], int(size))  # used by the logit-map networks, ignored by the others
        result = train_network(
            (tensors["train"], labels["train"]),
            (tensors["val"], labels["val"]),
            config,
            boxes=boxes,
            partners=twin_partners(parts["train"]),
        )
        per_epoch = (time.monotonic() - started) / max(1, len(result.history))
        predictor = Predictor(result.network, "auto", batch_size=16)
        inputs = list(tensors["test"].float())
        predictor.predict(inputs[:16])  # warm-up
        started = time.monotonic()
        probabilities = predictor.predict(inputs)
        throughput = len(inputs) / (time.monotonic() - started)
        test_auc = auroc(np.array([i.label for i in parts["test"]]), probabilities)
        parameters = sum(p.numel() for p in result.network.parameters())
        rows.append(
            {
                "arch": arch,
                "input_size": int(size),
                "crop": config.crop,
                "parameters": parameters,
                "test_auroc": test_auc,
                "train_seconds_per_epoch": per_epoch,
                "inference_images_per_second": throughput,
                "epochs_run": len(result.history),
                "best_epoch": result.best_epoch,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["inference_images_per_second"]
    for row in rows:
        row["throughput_vs_first"] = row["inference_images_per_second"] / base
        print(
            f"{row['arch']:>17} @ {row['input_size']} (crop {row['crop']}): AUROC {row['test_auroc']:.4f}, "
            f"{row['inference_images_per_second']:.0f} images/s ({row['throughput_vs_first']:.2f}x), "
            f"{row['train_seconds_per_epoch']:.0f} s/epoch, {row['parameters'] / 1e6:.2f} M parameters"
        )
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
