"""Classification metrics and operating-point selection."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_roc_auc


def auroc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Area under the ROC curve (MONAI's implementation); NaN when only one class is present."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(compute_roc_auc(torch.as_tensor(probabilities), torch.as_tensor(labels)))


def threshold_for_sensitivity(labels: np.ndarray, probabilities: np.ndarray, sensitivity: float) -> float:
    """The highest threshold whose sensitivity (p ≥ t called positive) is at least ``sensitivity``."""
    positives = np.sort(probabilities[labels == 1])
    if len(positives) == 0:
        return 0.5
    index = int(np.floor((1.0 - sensitivity) * len(positives)))
    return float(positives[min(index, len(positives) - 1)])


def threshold_for_specificity(labels: np.ndarray, probabilities: np.ndarray, specificity: float) -> float:
    """The lowest threshold whose specificity (p < t called negative) is at least ``specificity``."""
    negatives = np.sort(probabilities[labels == 0])
    if len(negatives) == 0:
        return 0.5
    index = int(np.ceil(specificity * len(negatives))) - 1
    value = float(negatives[min(max(index, 0), len(negatives) - 1)])
    return float(np.nextafter(value, 1.0))


@dataclass(frozen=True)
class BinaryReport:
    """Metrics at one threshold."""

    threshold: float
    sensitivity: float
    specificity: float
    accuracy: float
    precision: float
    f1: float
    tp: int
    fp: int
    tn: int
    fn: int


def at_threshold(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> BinaryReport:
    """Confusion matrix and derived metrics when p ≥ ``threshold`` is called positive."""
    predicted = probabilities >= threshold
    truth = labels == 1
    tp = int(np.sum(predicted & truth))
    fp = int(np.sum(predicted & ~truth))
    tn = int(np.sum(~predicted & ~truth))
    fn = int(np.sum(~predicted & truth))
    sensitivity = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    accuracy = (tp + tn) / max(1, len(labels))
    return BinaryReport(threshold, sensitivity, specificity, accuracy, precision, f1, tp, fp, tn, fn)
