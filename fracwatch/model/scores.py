"""Scoring preprocessed tensors in batches: per-input and per-class probabilities, an item as its strongest input."""

from __future__ import annotations

import numpy as np
import torch

from fracwatch.model.predictor import (
    autocast,
    fracture_probability,
)
from fracwatch.pipeline.transforms import tile_count_corrected


def predict_tensors(
    network: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 64
) -> np.ndarray:
    """Fracture probabilities for preprocessed images (eval mode, inference_mode)."""
    return class_probabilities(network, images, device, batch)[1]


def class_probabilities(
    network: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(per-class probabilities (N, C) — C = 2 for a binary model —, fracture probability (N,))."""
    network.eval()
    classes, fracture = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = images[start : start + batch].to(device, dtype=torch.float32, memory_format=torch.channels_last)
            with autocast(device):
                logits = network(x).float()
            p = fracture_probability(logits)
            fracture.append(p.cpu().numpy())
            if logits.shape[1] == 1:
                classes.append(torch.stack([1 - p, p], dim=1).cpu().numpy())
            else:
                classes.append(torch.softmax(logits, dim=1).cpu().numpy())
    if not fracture:
        return np.zeros((0, 2)), np.zeros(0)
    return np.concatenate(classes), np.concatenate(fracture)


def strongest_inputs(values: np.ndarray, owners: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per item, the largest of its inputs' ``values`` and the input holding it (the first among equals);
    ``owners`` (M,): each input's item, ascending, every item present — an image's tiles score as the
    strongest."""
    owner = owners.numpy()
    order = np.lexsort((-np.asarray(values), owner))  # by item, then the largest value first
    first = order[np.r_[True, owner[order][1:] != owner[order][:-1]]]
    return np.asarray(values)[first], first


def image_probabilities(
    values: np.ndarray, owners: torch.Tensor | None, count_correction: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per item, its fracture probability from its inputs' ``values`` — the strongest, its odds divided by the
    item's input count with ``count_correction`` (``transforms.tile_count_corrected``) — and the input holding
    it; ``owners`` as for ``strongest_inputs``, None: one input per item. An item's inputs are one frame's
    tiles (``datasets.load_inputs``), so their count is its tile count, as ``scoring.score_loaded`` counts it."""
    values = np.asarray(values)
    if owners is None:
        return values, np.arange(len(values))
    strongest, first = strongest_inputs(values, owners)
    if count_correction:
        strongest = tile_count_corrected(strongest, np.bincount(owners.numpy()))
    return strongest, first
