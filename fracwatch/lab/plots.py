"""Evaluation plots as PNG files (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from fracwatch.model.metrics import calibration_bins, pr_points, roc_points


def roc_plot(
    labels: np.ndarray,
    probabilities: np.ndarray,
    auc: float,
    ci: tuple[float, float],
    path: Path,
    points: dict[str, float] | None = None,
) -> Path:
    """ROC curve with the AUROC, its CI and the operating points marked."""
    fpr, tpr, thresholds = roc_points(labels, probabilities)
    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    axes.plot(fpr, tpr, lw=2, label=f"AUROC {auc:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})")
    axes.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    for name, threshold in (points or {}).items():
        index = int(np.argmin(np.abs(thresholds[1:] - threshold))) + 1
        axes.scatter([fpr[index]], [tpr[index]], zorder=3, label=f"{name} (p ≥ {threshold:.3f})")
    axes.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def pr_plot(labels: np.ndarray, probabilities: np.ndarray, path: Path) -> Path:
    """Precision-recall curve with the prevalence as baseline."""
    recall, precision = pr_points(labels, probabilities)
    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    axes.plot(recall, precision, lw=2)
    axes.axhline(float(np.mean(labels == 1)), ls="--", c="grey", lw=1, label="prevalence")
    axes.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower left", fontsize=8)
    return _save(figure, path)


def calibration_plot(labels: np.ndarray, probabilities: np.ndarray, path: Path) -> Path:
    """Reliability diagram: observed fraction of fractures against mean predicted probability per bin."""
    table = calibration_bins(labels, probabilities)
    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    axes.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    axes.plot([r["mean_probability"] for r in table], [r["observed"] for r in table], marker="o", lw=2)
    axes.set(xlabel="predicted probability", ylabel="observed fraction", title="Calibration", xlim=(0, 1), ylim=(0, 1))
    return _save(figure, path)


def confusion_plot(matrix: np.ndarray, names: list[str], path: Path) -> Path:
    """A confusion matrix (rows: truth, columns: prediction) with counts."""
    figure, axes = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5), dpi=100)
    axes.imshow(matrix, cmap="Blues")
    for (row, col), value in np.ndenumerate(matrix):
        axes.text(col, row, str(int(value)), ha="center", va="center")
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    return _save(figure, path)


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
