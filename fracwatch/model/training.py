"""Training: a network from a labelled tensor data set, early stopping on validation AUROC, a model bundle.

Datasets here are in-memory tensors already passed through :func:`fracwatch.pipeline.transforms.preprocess`
— the same function the daemon uses — so training and inference see identical inputs.
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, RandFlip, RandRotate90

from fracwatch.model.bundle import (
    Architecture,
    ModelCard,
    OperatingPoints,
    Preprocessing,
    Weights,
    new_device_uid,
    save_bundle,
)
from fracwatch.model.metrics import at_threshold, auroc, threshold_for_sensitivity, threshold_for_specificity
from fracwatch.model.networks import PRESETS, build_network
from fracwatch.model.phantom import render_phantom
from fracwatch.model.predictor import select_device
from fracwatch.pipeline.transforms import PreprocessConfig, preprocess

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """What a training run needs; recorded in the model card."""

    arch: str = "tiny-resnet"
    input_size: int = 256
    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 0
    patience: int = 6
    device: str = "auto"
    doubt_sensitivity: float = 0.95
    positive_specificity: float = 0.95


@dataclass
class TrainResult:
    network: torch.nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    validation_probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0))
    best_epoch: int = 0


def phantom_dataset(
    count: int, seed: int, config: PreprocessConfig, progress: Callable[[int], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` phantoms (half fractured), preprocessed: images (N, 1, S, S) float16 and labels (N,)."""
    images = torch.empty((count, 1, config.input_size, config.input_size), dtype=torch.float16)
    labels = torch.empty(count, dtype=torch.float32)
    for index in range(count):
        phantom = render_phantom(seed * 1_000_003 + index, fractured=index % 2 == 1)
        images[index] = preprocess(phantom.image, config).to(torch.float16)
        labels[index] = float(phantom.fractured)
        if progress is not None:
            progress(index + 1)
    return images, labels


def _augment(seed: int) -> Compose:
    augment = Compose([RandFlip(prob=0.5, spatial_axis=0), RandFlip(prob=0.5, spatial_axis=1), RandRotate90(prob=0.5)])
    augment.set_random_state(seed=seed)
    return augment


def predict_tensors(
    network: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 64
) -> np.ndarray:
    """Probabilities for preprocessed images (eval mode, inference_mode)."""
    network.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = images[start : start + batch].to(device, dtype=torch.float32)
            with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
                logits = network(x).float().reshape(-1)
            out.append(torch.sigmoid(logits).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def train_network(
    train: tuple[torch.Tensor, torch.Tensor],
    validation: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
) -> TrainResult:
    """Train with AdamW + BCE, class-balanced by loss weight; keep the epoch with the best validation AUROC."""
    torch.manual_seed(config.seed)
    device = select_device(config.device)
    builder, params = PRESETS[config.arch]
    network = build_network(builder, params).to(device)
    images, labels = train
    positives = float(labels.sum())
    pos_weight = torch.tensor([(len(labels) - positives) / max(positives, 1.0)], device=device)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    steps = config.epochs * ((len(images) + config.batch_size - 1) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.learning_rate, total_steps=steps)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    augment = _augment(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult(network=network)
    best_auc, best_state, stale = -1.0, copy.deepcopy(network.state_dict()), 0
    for epoch in range(1, config.epochs + 1):
        network.train()
        started, total = time.monotonic(), 0.0
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), config.batch_size):
            batch_index = order[start : start + config.batch_size]
            x = torch.stack([torch.as_tensor(augment(images[i].float())) for i in batch_index]).to(device)
            y = labels[batch_index].to(device)
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
                loss = loss_fn(network(x).reshape(-1), y)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            scheduler.step()
            total += loss.item() * len(batch_index)
        probabilities = predict_tensors(network, validation[0], device)
        val_auc = auroc(validation[1].numpy(), probabilities)
        record = {
            "epoch": epoch,
            "loss": total / len(images),
            "val_auroc": val_auc,
            "seconds": time.monotonic() - started,
        }
        result.history.append(record)
        LOGGER.info(
            "epoch %d: loss %.4f, validation AUROC %.4f (%.0f s)", epoch, record["loss"], val_auc, record["seconds"]
        )
        if val_auc > best_auc:
            best_auc, best_state, stale = val_auc, copy.deepcopy(network.state_dict()), 0
            result.best_epoch = epoch
        else:
            stale += 1
            if stale >= config.patience:
                LOGGER.info("early stop: no AUROC gain for %d epochs", stale)
                break
    network.load_state_dict(best_state)
    result.network = network.cpu().eval()
    result.validation_probabilities = predict_tensors(result.network, validation[0], torch.device("cpu"))
    return result


def operating_points(labels: np.ndarray, probabilities: np.ndarray, config: TrainConfig) -> OperatingPoints:
    """Doubt: sensitivity ≥ ``doubt_sensitivity``; positive: specificity ≥ ``positive_specificity``.

    The two candidates are the highest threshold meeting the sensitivity target and the lowest meeting the
    specificity target; the lower becomes ``doubt`` and the higher ``positive``. Both targets hold either way:
    lowering a threshold only raises sensitivity, raising it only raises specificity.
    """
    doubt = threshold_for_sensitivity(labels, probabilities, config.doubt_sensitivity)
    positive = threshold_for_specificity(labels, probabilities, config.positive_specificity)
    return OperatingPoints(doubt=min(doubt, positive), positive=max(doubt, positive))


def build_card(
    name: str,
    version: str,
    config: TrainConfig,
    result: TrainResult,
    validation_labels: np.ndarray,
    training: dict[str, Any],
    intended_use: str,
    warnings: list[str],
) -> ModelCard:
    """A model card filled from the run (the weights checksum is set when the bundle is saved)."""
    builder, params = PRESETS[config.arch]
    points = operating_points(validation_labels, result.validation_probabilities, config)
    probabilities = result.validation_probabilities
    metrics = {
        "validation_auroc": auroc(validation_labels, probabilities),
        "validation_size": len(validation_labels),
        "at_doubt": asdict(at_threshold(validation_labels, probabilities, points.doubt)),
        "at_positive": asdict(at_threshold(validation_labels, probabilities, points.positive)),
        "history": result.history,
        "best_epoch": result.best_epoch,
    }
    return ModelCard(
        name=name,
        version=version,
        device_uid=new_device_uid(),
        architecture=Architecture(name=builder, params=params),
        preprocessing=Preprocessing(input_size=config.input_size, percentile_low=0.5, percentile_high=99.5),
        class_names=["no fracture", "fracture"],
        operating_points=points,
        weights=Weights(sha256="0" * 64),
        created=datetime.now(UTC),
        training={
            **training,
            "config": asdict(config),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        metrics=metrics,
        intended_use=intended_use,
        clinical_use=False,
        warnings=warnings,
    )


PHANTOM_INTENDED_USE = (
    "Bootstrap model for fracwatch's pipeline and tests, trained only on 2-D procedural limb phantoms "
    "(fracwatch.model.phantom). It has never seen a real radiograph. NOT FOR CLINICAL USE."
)


def train_phantom_bundle(
    out: Path, config: TrainConfig, train_count: int, validation_count: int, version: str
) -> ModelCard:
    """Render phantoms, train, choose operating points on validation phantoms, write the bundle to ``out``."""
    preprocess_config = PreprocessConfig(input_size=config.input_size)
    LOGGER.info("rendering %d training and %d validation phantoms", train_count, validation_count)
    train = phantom_dataset(train_count, seed=config.seed * 2 + 1, config=preprocess_config)
    validation = phantom_dataset(validation_count, seed=config.seed * 2 + 2, config=preprocess_config)
    result = train_network(train, validation, config)
    training = {
        "data": f"{train_count} training / {validation_count} validation 2-D procedural phantoms, half fractured",
        "command": (
            f"fracwatch train --phantom --out {out} --arch {config.arch} --input-size {config.input_size} "
            f"--epochs {config.epochs} --batch-size {config.batch_size} --train-count {train_count} "
            f"--val-count {validation_count} --seed {config.seed} --version {version}"
        ),
        "seed": config.seed,
    }
    card = build_card(
        out.name,
        version,
        config,
        result,
        validation[1].numpy(),
        training,
        PHANTOM_INTENDED_USE,
        ["Not for clinical use.", "Trained on synthetic phantoms only; performance on real radiographs is unknown."],
    )
    return save_bundle(out, card, result.network)
