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
    value = negatives[min(max(index, 0), len(negatives) - 1)]
    # The next value up in the scores' own precision: a float64 step above a float32 score rounds back onto it when
    # float32 scores are compared with the threshold, and that negative would count as positive.
    return float(np.nextafter(value, np.asarray(np.inf, dtype=negatives.dtype)))


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


def bootstrap_auroc_ci(
    labels: np.ndarray, probabilities: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUROC (resampling cases, both classes kept)."""
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan"), float("nan")
    values = []
    for _ in range(resamples):
        chosen = np.concatenate([rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))])
        values.append(auroc(labels[chosen], probabilities[chosen]))
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def _counts_at_thresholds(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, false positives, threshold) calling p ≥ threshold positive, at every distinct score."""
    order = np.argsort(-probabilities, kind="mergesort")
    scores, truth = probabilities[order], labels[order] == 1
    distinct = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    return np.cumsum(truth)[distinct], np.cumsum(~truth)[distinct], scores[distinct]


def roc_points(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds) at every distinct score, from the top."""
    tps, fps, thresholds = _counts_at_thresholds(labels, probabilities)
    tpr = np.r_[0.0, tps / max(int(np.sum(labels == 1)), 1)]
    fpr = np.r_[0.0, fps / max(int(np.sum(labels != 1)), 1)]
    return fpr, tpr, np.r_[np.inf, thresholds]


def pr_points(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct score, from the top."""
    tps, fps, _thresholds = _counts_at_thresholds(labels, probabilities)
    return tps / max(int(np.sum(labels == 1)), 1), tps / (tps + fps)


def calibration_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Reliability table: per probability bin, mean predicted probability, observed fraction, count."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probabilities, edges) - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            out.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "mean_probability": float(probabilities[chosen].mean()),
                    "observed": float(labels[chosen].mean()),
                    "count": int(chosen.sum()),
                }
            )
    return out


def expected_calibration_error(table: list[dict[str, float]]) -> float:
    """Count-weighted mean |observed - predicted| over the reliability table."""
    total = sum(row["count"] for row in table)
    return float(sum(row["count"] * abs(row["observed"] - row["mean_probability"]) for row in table) / max(total, 1))
