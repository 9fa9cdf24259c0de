"""What a training run writes into its bundle's model card: operating points and the card itself."""

from __future__ import annotations

import platform
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from fracwatch.model.bundle import (
    Architecture,
    ModelCard,
    OperatingPoints,
    Preprocessing,
    Weights,
    new_device_uid,
)
from fracwatch.model.metrics import at_threshold, auroc, threshold_for_sensitivity, threshold_for_specificity
from fracwatch.model.networks import PRESETS
from fracwatch.model.predictor import (
    describe_device,
    select_device,
)
from fracwatch.model.training import TrainConfig, TrainResult


def operating_points(labels: np.ndarray, probabilities: np.ndarray, config: TrainConfig) -> OperatingPoints:
    """Doubt: sensitivity ≥ ``doubt_sensitivity``; positive: specificity ≥ ``positive_specificity``.

    The two candidates are the highest threshold meeting the sensitivity target and the lowest meeting the
    specificity target; the lower becomes ``doubt`` and the higher ``positive``. Both targets hold either way:
    lowering a threshold only raises sensitivity, raising it only raises specificity.
    """
    doubt = threshold_for_sensitivity(labels, probabilities, config.doubt_sensitivity)
    positive = threshold_for_specificity(labels, probabilities, config.positive_specificity)
    return OperatingPoints(doubt=min(doubt, positive), positive=max(doubt, positive))


def at_operating_points(labels: np.ndarray, probabilities: np.ndarray, points: OperatingPoints) -> dict[str, Any]:
    """The card's and the report's ``at_doubt`` / ``at_positive``: confusion and rates at each operating point."""
    return {
        "at_doubt": asdict(at_threshold(labels, probabilities, points.doubt)),
        "at_positive": asdict(at_threshold(labels, probabilities, points.positive)),
    }


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
    params = {**params, "outputs": config.outputs} if config.outputs > 1 else params
    validation_labels = (validation_labels > 0).astype(np.int64)
    points = operating_points(validation_labels, result.validation_probabilities, config)
    probabilities = result.validation_probabilities
    metrics = {
        "validation_auroc": auroc(validation_labels, probabilities),
        "validation_size": len(validation_labels),
        **at_operating_points(validation_labels, probabilities, points),
        "history": result.history,
        "best_epoch": result.best_epoch,
    }
    return ModelCard(
        name=name,
        version=version,
        device_uid=new_device_uid(),
        architecture=Architecture(name=builder, params=params),
        preprocessing=Preprocessing(
            input_size=config.input_size,
            percentile_low=0.5,
            percentile_high=99.5,
            tile_spacing_mm=config.tile_spacing_mm,
            tile_count_correction=config.tile_count_correction,
        ),
        class_names=list(config.classes),
        operating_points=points,
        weights=Weights(sha256="0" * 64),
        created=datetime.now(UTC),
        training={
            **training,
            "config": asdict(config),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": describe_device(select_device(config.device)),
        },
        metrics=metrics,
        intended_use=intended_use,
        clinical_use=False,
        warnings=warnings,
    )
