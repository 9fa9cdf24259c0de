"""``fracwatch evaluate``: a bundle scored on a data set; AUROC with intervals, breakdowns, plots, operating points."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fracwatch.errors import FracwatchError
from fracwatch.lab import plots
from fracwatch.lab.datasets import (
    DatasetError,
    Item,
    LoadedInputs,
    Progress,
    chosen_tiles,
    input_boxes,
    input_spacing_band,
    load_inputs,
    read_dataset,
    twin_partners,
)
from fracwatch.model.augmentation import box_masks
from fracwatch.model.bundle import (
    Bundle,
    ModelCard,
    OperatingPoints,
    load_bundle,
    write_card,
)
from fracwatch.model.card import at_operating_points, operating_points
from fracwatch.model.gradcam import grad_cam
from fracwatch.model.metrics import (
    at_threshold,
    auroc,
    bootstrap_auroc_ci,
    calibration_bins,
    expected_calibration_error,
)
from fracwatch.model.scores import class_probabilities, image_probabilities
from fracwatch.model.training import TrainConfig

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateRequest:
    """What ``fracwatch evaluate`` asks for."""

    bundle: Path
    source: Path
    out: Path
    split: str | None = None  # default: "test" when the data set has splits, else everything
    layout: str = "auto"
    labels_csv: Path | None = None
    set_operating_points: bool = False
    record_in_card: bool = False  # store the report's summary in the card (the shipped model's test results)
    doubt_sensitivity: float = 0.95
    positive_specificity: float = 0.95
    bootstrap: int = 1000
    device: str = "auto"
    load_workers: int = 0  # processes that decode and preprocess the images (0: this process)
    # score with tiles at this spacing (0: whole images) instead of the bundle's; with set_operating_points it is
    # stored with the points, which hold only for the scoring they were chosen with
    tile_spacing_mm: float | None = None
    # divide a tiled image's strongest-tile odds by its tile count (None: as the bundle's card says); stored like
    # tile_spacing_mm
    tile_count_correction: bool | None = None


def _binary_summary(labels: np.ndarray, probabilities: np.ndarray, card: ModelCard, resamples: int) -> dict[str, Any]:
    auc = auroc(labels, probabilities)
    low, high = bootstrap_auroc_ci(labels, probabilities, resamples)
    points = card.operating_points
    return {
        "images": len(labels),
        "fractured": int(labels.sum()),
        "auroc": auc,
        "auroc_ci95": [low, high],
        **at_operating_points(labels, probabilities, points),
    }


def _breakdown(
    items: Sequence[Item], labels: np.ndarray, probabilities: np.ndarray, card: ModelCard, key: str
) -> dict[str, Any]:
    """Per value of a manifest column: AUROC (that value's images) and sensitivity at both points.

    For ``bone_class``, each class's fractures are scored against every non-fractured image.
    """
    values = sorted({i.meta.get(key, "") for i in items} - {""})
    out: dict[str, Any] = {}
    negatives = labels == 0
    for value in values:
        chosen = np.array([i.meta.get(key, "") == value for i in items])
        if key == "bone_class":
            if value == "none":
                continue
            chosen = chosen | negatives
        sub_labels, sub_probs = labels[chosen], probabilities[chosen]
        out[value] = {
            "images": int(chosen.sum()),
            "fractured": int(sub_labels.sum()),
            "auroc": auroc(sub_labels, sub_probs),
            "sensitivity_at_doubt": at_threshold(sub_labels, sub_probs, card.operating_points.doubt).sensitivity,
            "sensitivity_at_positive": at_threshold(sub_labels, sub_probs, card.operating_points.positive).sensitivity,
        }
    return out


def _twin_pairs(items: Sequence[Item]) -> list[tuple[int, int]]:
    """(fractured, twin) positions of every fractured item that has a twin (synth ``--twins`` data)."""
    partners = twin_partners(items)
    if partners is None:
        return []
    return [(k, int(partners[k])) for k, item in enumerate(items) if item.label == 1 and int(partners[k]) >= 0]


def twin_comparison(items: Sequence[Item], probabilities: np.ndarray) -> dict[str, Any] | None:
    """For data with twins (a fractured synth image and the same image without the break): how often the fractured
    one scores higher, whatever in the image makes it so. None without pairs."""
    pairs = _twin_pairs(items)
    if not pairs:
        return None
    above = sum(bool(probabilities[f] > probabilities[t]) for f, t in pairs)
    ties = sum(bool(probabilities[f] == probabilities[t]) for f, t in pairs)
    return {"pairs": len(pairs), "fractured_above_twin": above / len(pairs), "ties": ties / len(pairs)}


SEEN_MARGIN = 1.0  # logits a break's cells must rise above the same cells of its twin to count as seen


def break_rises(
    network: torch.nn.Module,
    images: torch.Tensor,
    items: Sequence[Item],
    device: torch.device,
    boxes: torch.Tensor | None = None,
    batch: int = 32,
) -> dict[int, float] | None:
    """For a binary logit-map network on twin data with boxes: per fractured item (its position), how many logits
    its box's strongest map cell rises above the same cells of its twin — detection at the break itself, apart
    from how the image's maximum ranks. The box's cells are the localisation loss's (``box_masks`` max-pooled to
    the map). ``images`` holds one input per item, ``boxes`` the breaks in its pixels (default: whole-image
    inputs' ``input_boxes``). None where the network has no map or the data no boxed pairs."""
    logit_map = getattr(network, "logit_map", None)
    boxes = input_boxes(items, images.shape[-1]) if boxes is None else boxes
    pairs = [(f, t) for f, t in _twin_pairs(items) if not bool(torch.isnan(boxes[f, 0]))]
    if logit_map is None or not pairs:
        return None
    rises: dict[int, float] = {}
    network.eval()
    with torch.inference_mode():
        for start in range(0, len(pairs), batch):
            fractured, twins = (list(side) for side in zip(*pairs[start : start + batch], strict=True))
            maps = logit_map(images[fractured + twins].to(device, dtype=torch.float32))[:, :1].float().cpu()
            ours, theirs = maps[: len(fractured)], maps[len(fractured) :]
            cells = F.adaptive_max_pool2d(box_masks(boxes[fractured], images.shape[-1]), maps.shape[-2:]) > 0
            rise = _amax_where(ours, cells) - _amax_where(theirs, cells)
            rises.update(zip(fractured, rise.tolist(), strict=True))
    return rises


def break_inputs(items: Sequence[Item], loaded: LoadedInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """One input per item for ``break_rises`` and the breaks' boxes in its pixels: its chosen tile where it was
    tiled (``chosen_tiles``: the one holding the box best, the same for its twin), else its first input."""
    chosen = chosen_tiles(items, loaded.grids, loaded.images.shape[-1])
    offsets = torch.tensor([tile or 0 for tile in chosen.tiles], dtype=torch.long)
    return loaded.images[loaded.first() + offsets], chosen.boxes


CAM_MARGIN_PX = 4  # input pixels around a box that still count: Grad-CAM of layer4 is upsampled from 16 x 16 cells


def cam_peaks_in_boxes(
    network: torch.nn.Module, images: torch.Tensor, boxes: torch.Tensor, labels: np.ndarray, batch: int = 32
) -> dict[str, Any] | None:
    """Grad-CAM sanity on the fractured items with a box: the share whose heat map peaks inside the break's box
    (in the input's pixels, ``CAM_MARGIN_PX`` around it), beside the share of the input the boxes cover — what
    a peak thrown at random would hit. ``images`` one input per item and ``boxes`` in its pixels
    (``break_inputs``). None where no fractured item has a box."""
    chosen = [i for i in range(len(labels)) if labels[i] == 1 and not bool(torch.isnan(boxes[i, 0]))]
    if not chosen:
        return None
    size = images.shape[-1]
    hits, areas = [], []
    for start in range(0, len(chosen), batch):
        part = chosen[start : start + batch]
        device = next(network.parameters()).device
        maps = grad_cam(network, images[part].to(device, torch.float32))
        for index, heat in zip(part, maps, strict=True):
            box = tuple(float(v) for v in boxes[index])
            hits.append(peak_in_box(heat, box))  # type: ignore[arg-type,unused-ignore]
            areas.append(box_share(box, size))  # type: ignore[arg-type,unused-ignore]
    return {
        "images": len(chosen),
        "peak_in_box": float(np.mean(hits)),
        "chance": float(np.mean(areas)),
        "margin_px": CAM_MARGIN_PX,
    }


def _grown(box: tuple[float, float, float, float], size: int) -> tuple[float, float, float, float]:
    m = CAM_MARGIN_PX
    return max(0.0, box[0] - m), max(0.0, box[1] - m), min(float(size), box[2] + m), min(float(size), box[3] + m)


def peak_in_box(heat: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    """Whether the (S, S) heat map's strongest pixel lies in ``box`` (x0, y0, x1, y1), ``CAM_MARGIN_PX`` around."""
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    x0, y0, x1, y1 = _grown(box, heat.shape[-1])
    return bool(x0 <= col <= x1 and y0 <= row <= y1)


def box_share(box: tuple[float, float, float, float], size: int) -> float:
    """The share of a ``size`` x ``size`` input ``box`` covers with its margin: a random peak's chance of a hit."""
    x0, y0, x1, y1 = _grown(box, size)
    return max(0.0, x1 - x0) * max(0.0, y1 - y0) / size**2


def breaks_seen(rises: dict[int, float]) -> dict[str, Any]:
    """The share of breaks whose cells rise more than ``SEEN_MARGIN`` logits over their twin's (``break_rises``)."""
    seen = sum(rise > SEEN_MARGIN for rise in rises.values())
    return {"pairs": len(rises), "breaks_seen": seen / len(rises), "margin_logits": SEEN_MARGIN}


def write_scores(
    path: Path, items: Sequence[Item], probabilities: np.ndarray, source: Path, rises: dict[int, float] | None
) -> Path:
    """One row per scored image: its file (relative to the data set), label, class, P(fracture), the manifest's
    descriptive columns and, for boxed breaks of a logit-map network, ``break_rise_logits`` — what an engineer
    sorts to find the misses."""
    root = source if source.is_dir() else source.parent
    meta_keys = [k for k in dict.fromkeys(k for i in items for k in i.meta) if any(i.meta.get(k) for i in items)]
    columns = ["path", "label", "class", "probability", "pair", *meta_keys]
    columns += ["break_rise_logits"] if rises else []
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for index, item in enumerate(items):
            where = item.path.relative_to(root) if item.path.is_relative_to(root) else item.path
            row: dict[str, Any] = {"path": str(where), "label": item.label, "class": item.class_name}
            row |= {"probability": f"{float(probabilities[index]):.6f}", "pair": item.pair}
            row |= {k: item.meta.get(k, "") for k in meta_keys}
            if rises:
                row["break_rise_logits"] = f"{rises[index]:.4f}" if index in rises else ""
            writer.writerow(row)
    return path


def _amax_where(maps: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Per image, the largest of a (N, 1, h, w) map's cells where ``where`` holds (-inf where it holds nowhere)."""
    return torch.where(where, maps, float("-inf")).amax(dim=(1, 2, 3))


def _multiclass(items: Sequence[Item], classes: np.ndarray, names: list[str], out: Path) -> dict[str, Any]:
    truth = np.array([names.index(i.class_name) if i.label == 1 and i.class_name in names else 0 for i in items])
    predicted = classes.argmax(axis=1)
    matrix = np.zeros((len(names), len(names)), dtype=int)
    for t, p in zip(truth, predicted, strict=True):
        matrix[t, p] += 1
    per_class = {}
    for index, name in enumerate(names):
        tp = int(matrix[index, index])
        fp, fn = int(matrix[:, index].sum()) - tp, int(matrix[index].sum()) - tp
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / (tp + fn) if tp + fn else float("nan")
        per_class[name] = {
            "images": int(matrix[index].sum()),
            "auroc_one_vs_rest": auroc((truth == index).astype(int), classes[:, index]),
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else float("nan"),
        }
    plots.confusion_plot(matrix, names, out / "confusion_multiclass.png")
    return {
        "classes": names,
        "confusion_matrix": matrix.tolist(),
        "per_class": per_class,
        "accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)),
    }


def evaluate_bundle(request: EvaluateRequest, progress: Progress | None = None) -> dict[str, Any]:
    """Score a labelled data set with a bundle; write report.json and ROC/PR/calibration/confusion plots."""
    stored = load_bundle(request.bundle)
    bundle = _scored_as(stored, request.tile_spacing_mm, request.tile_count_correction)
    if request.record_in_card and not request.set_operating_points and bundle.card != stored.card:
        raise FracwatchError(
            "--record-in-card with another --tile-spacing-mm or --tile-count-correction than the bundle's would "
            "record results its operating points were not chosen for; choose them too (--set-operating-points on "
            "validation data) first"
        )
    items = read_dataset(request.source, request.layout, request.labels_csv)
    split = request.split or ("test" if any(i.split == "test" for i in items) else None)
    if split is not None:
        items = [i for i in items if i.split == split]
    if len({i.label for i in items}) < 2:
        raise DatasetError(f"the evaluation set ({split or 'all'}) needs fractured and non-fractured images")
    preprocess = bundle.preprocess_config
    items = [replace(i, meta={**i.meta, "input_mm_per_px": input_spacing_band(i, preprocess)}) for i in items]
    loaded = load_inputs(
        items, preprocess, (lambda n: progress("scoring", n, len(items))) if progress else None, request.load_workers
    )
    device = torch.device("cuda" if request.device != "cpu" and torch.cuda.is_available() else "cpu")
    per_input_classes, per_input = class_probabilities(bundle.network.to(device), loaded.images, device)
    # an image scores as its strongest tile (odds divided by its tile count where the card says so)
    probabilities, strongest = image_probabilities(per_input, loaded.owners, preprocess.tile_count_correction)
    classes = per_input_classes[strongest]
    twins = twin_comparison(items, probabilities)
    binary = len(bundle.card.class_names) == 2  # a multi-class map's channel 0 is "no fracture"
    labels = np.array([i.label for i in items], dtype=np.int64)
    boxed = binary and any(i.box is not None for i in items)
    # one input per item holding its break (its tile), shared by the twins' rises and the Grad-CAM check
    located = break_inputs(items, loaded) if boxed or (twins is not None and binary) else None
    rises = None
    if twins is not None and binary and located is not None:
        rises = break_rises(bundle.network, located[0], items, device, located[1])
    if twins is not None and rises is not None:
        twins["localised"] = breaks_seen(rises)
    cam = cam_peaks_in_boxes(bundle.network, *located, labels) if boxed and located is not None else None
    bundle.network.cpu()
    card = bundle.card
    if request.set_operating_points:
        config = TrainConfig(
            doubt_sensitivity=request.doubt_sensitivity, positive_specificity=request.positive_specificity
        )
        chosen = operating_points(labels, probabilities, config)
        card = _write_operating_points(bundle, chosen, split, labels, probabilities)
    request.out.mkdir(parents=True, exist_ok=True)
    summary = _binary_summary(labels, probabilities, card, request.bootstrap)
    table = calibration_bins(labels, probabilities)
    report: dict[str, Any] = {
        "model": {"name": card.name, "version": card.version, "device_uid": card.device_uid},
        "data": {"source": str(request.source), "split": split or "all"},
        "operating_points": card.operating_points.model_dump(),
        **summary,
        "calibration": {"bins": table, "expected_calibration_error": expected_calibration_error(table)},
        "breakdown": {
            key: _breakdown(items, labels, probabilities, card, key)
            for key in ("view", "bone_class", "fov", "input_mm_per_px")
            if any(i.meta.get(key) for i in items)
        },
        "plots": {},
        "files": {"scores": write_scores(request.out / "scores.csv", items, probabilities, request.source, rises).name},
    }
    points = {"doubt": card.operating_points.doubt, "positive": card.operating_points.positive}
    report["plots"]["roc"] = plots.roc_plot(
        labels, probabilities, summary["auroc"], tuple(summary["auroc_ci95"]), request.out / "roc.png", points
    ).name
    report["plots"]["pr"] = plots.pr_plot(labels, probabilities, request.out / "pr.png").name
    report["plots"]["calibration"] = plots.calibration_plot(labels, probabilities, request.out / "calibration.png").name
    at_positive = summary["at_positive"]
    matrix = np.array([[at_positive["tn"], at_positive["fp"]], [at_positive["fn"], at_positive["tp"]]])
    report["plots"]["confusion"] = plots.confusion_plot(
        matrix, ["no fracture", "fracture"], request.out / "confusion.png"
    ).name
    if twins is not None:
        report["twins"] = twins
    if cam is not None:
        report["grad_cam"] = cam
    if len(card.class_names) > 2:
        report["multiclass"] = _multiclass(items, classes, list(card.class_names), request.out)
    report = _finite(report)
    (request.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if request.record_in_card:
        _record(bundle, card, report)
    return report


def _scored_as(bundle: Bundle, tile_spacing_mm: float | None, tile_count_correction: bool | None) -> Bundle:
    """The bundle as it scores with ``tile_spacing_mm`` (0: whole images) and ``tile_count_correction`` (None,
    either: as its card says)."""
    update: dict[str, Any] = {}
    if tile_spacing_mm is not None:
        update["tile_spacing_mm"] = tile_spacing_mm or None
    if tile_count_correction is not None:
        update["tile_count_correction"] = tile_count_correction
    if not update:
        return bundle
    preprocessing = bundle.card.preprocessing.model_copy(update=update)
    return Bundle(bundle.path, bundle.card.model_copy(update={"preprocessing": preprocessing}), bundle.network)


def _write_operating_points(
    bundle: Bundle, points: OperatingPoints, split: str | None, labels: np.ndarray, probabilities: np.ndarray
) -> ModelCard:
    """Store operating points chosen on these (validation) data in the bundle's card, with the preprocessing they
    were chosen with (its tile spacing); weights are unchanged.

    The card's ``at_doubt`` / ``at_positive`` describe the points in force, so they are recounted on the same data.
    """
    card = bundle.card.model_copy(update={"operating_points": points})
    card.metrics["operating_points_chosen_on"] = split or "all"
    card.metrics.update(at_operating_points(labels, probabilities, points))
    write_card(bundle.path, card)
    LOGGER.info("operating points written to %s: doubt %.4f, positive %.4f", bundle.path, points.doubt, points.positive)
    return card


def _record(bundle: Bundle, card: ModelCard, report: dict[str, Any]) -> None:
    keys = ["data", "images", "fractured", "auroc", "auroc_ci95", "at_doubt", "at_positive", "breakdown"]
    keys += ["calibration", "twins", "grad_cam"]
    summary: dict[str, Any] = {key: report[key] for key in keys if key in report}
    if "multiclass" in report:
        summary["multiclass"] = {k: report["multiclass"][k] for k in ("classes", "accuracy", "per_class")}
    card.metrics[f"evaluation_{report['data']['split']}"] = summary
    write_card(bundle.path, card)


def _finite(value: Any) -> Any:
    """NaN/inf become null and numpy scalars plain numbers, so the report is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
