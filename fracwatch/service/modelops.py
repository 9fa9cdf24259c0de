"""The model lifecycle behind ``fracwatch train`` and ``fracwatch evaluate``: data sets in, bundles and reports out."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fracwatch.errors import FracwatchError
from fracwatch.model import plots
from fracwatch.model.bundle import (
    CARD_NAME,
    Bundle,
    ModelCard,
    OperatingPoints,
    load_bundle,
    save_bundle,
    weights_provenance,
)
from fracwatch.model.metrics import (
    at_threshold,
    auroc,
    bootstrap_auroc_ci,
    calibration_bins,
    expected_calibration_error,
)
from fracwatch.model.training import (
    TrainConfig,
    at_operating_points,
    box_masks,
    build_card,
    class_probabilities,
    image_probabilities,
    operating_points,
    train_network,
)
from fracwatch.pipeline.transforms import PreprocessConfig
from fracwatch.service.datasets import (
    DatasetError,
    Item,
    LoadedInputs,
    assign_splits,
    chosen_tiles,
    input_boxes,
    input_spacing_band,
    item_grids,
    load_inputs,
    load_tensors,
    read_dataset,
    twin_partners,
)

LOGGER = logging.getLogger(__name__)

SYNTH_INTENDED_USE = (
    "Research and integration testing of fracwatch. Trained on synthetic radiographs (digitally reconstructed "
    "radiographs rendered from one chest CT with simulated fractures); it has never seen a real radiograph. "
    "NOT A CLINICAL DEVICE and not for diagnostic use: retrain and validate on your own data with "
    "`fracwatch train` / `fracwatch evaluate`."
)
GENERIC_INTENDED_USE = (
    "Fracture triage research model trained with fracwatch on the data set named in `training.data`. Not a "
    "clinical device; validate on local data before any use."
)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class TrainRequest:
    """What ``fracwatch train`` asks for."""

    source: Path
    out: Path
    config: TrainConfig
    layout: str = "auto"
    labels_csv: Path | None = None
    val_fraction: float = 0.15
    folds: int = 1
    task: str = "binary"  # binary, or "bone": no fracture / rib / clavicle / humerus / ... from the class column
    version: str = "1.0.0"
    name: str | None = None
    resume: bool = False
    command: str = ""  # the command line that reproduces the run, for the model card
    load_workers: int = 0  # processes that decode and preprocess the images (0: this process)


def _classes(items: Sequence[Item], task: str) -> tuple[str, ...]:
    if task == "binary":
        return ("no fracture", "fracture")
    names = sorted({i.class_name for i in items if i.label == 1 and i.class_name})
    if len(names) < 2:
        raise DatasetError("a multi-class task needs at least two fracture classes in the data (e.g. synth bone_class)")
    return ("no fracture", *names)


def _targets(items: Sequence[Item], classes: tuple[str, ...]) -> torch.Tensor:
    if len(classes) == 2:
        return torch.tensor([float(i.label) for i in items])
    index = {name: n for n, name in enumerate(classes)}
    return torch.tensor([index.get(i.class_name, 0) if i.label == 1 else 0 for i in items], dtype=torch.long)


def _load(
    items: Sequence[Item], config: PreprocessConfig, progress: Progress | None, stage: str, workers: int
) -> torch.Tensor:
    return load_tensors(
        items, config, progress=(lambda n: progress(stage, n, len(items))) if progress else None, workers=workers
    )


def _boxes(items: Sequence[Item], config: PreprocessConfig) -> torch.Tensor | None:
    """The fractures' boxes in the pixels of each item's training input (its whole image or its chosen tile),
    NaN where none, or None when no item has one."""
    if not any(i.box is not None for i in items):
        return None
    chosen = chosen_tiles(items, item_grids(items, config), config.input_size)
    LOGGER.info(
        "%d of %d fractured images carry a box; %d tiled images stand as their fracture's tile",
        int((~torch.isnan(chosen.boxes[:, 0])).sum()),
        sum(i.label for i in items),
        sum(t is not None for t in chosen.tiles),
    )
    return chosen.boxes


def group_folds(items: Sequence[Item], folds: int, seed: int) -> list[list[int]]:
    """Indices of ``folds`` folds: groups kept whole, each fold with about the same share of positives."""
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.group or f"item{index}", []).append(index)
    keys = list(groups)
    np.random.default_rng(seed).shuffle(keys)
    keys.sort(key=lambda k: -sum(items[i].label for i in groups[k]))  # deal positive-rich groups first
    buckets: list[list[int]] = [[] for _ in range(folds)]
    positives = [0] * folds
    for key in keys:
        target = min(range(folds), key=lambda f: (positives[f], len(buckets[f])))
        buckets[target].extend(groups[key])
        positives[target] += sum(items[i].label for i in groups[key])
    return buckets


def cross_validate(
    items: Sequence[Item],
    images: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    folds: int,
    boxes: torch.Tensor | None = None,
) -> dict[str, Any]:
    """K-fold cross-validation: validation AUROC per fold, mean ± sd."""
    results = []
    for fold, held in enumerate(group_folds(items, folds, config.seed)):
        held_set = set(held)
        kept = [i for i in range(len(items)) if i not in held_set]
        LOGGER.info("fold %d/%d: %d training, %d validation images", fold + 1, folds, len(kept), len(held))
        result = train_network(
            (images[kept], targets[kept]),
            (images[held], targets[held]),
            replace(config, seed=config.seed + fold),
            boxes=boxes[kept] if boxes is not None else None,
            partners=twin_partners([items[i] for i in kept]),
        )
        truth = (targets[held] > 0).numpy().astype(np.int64)
        results.append(
            {
                "fold": fold + 1,
                "validation_auroc": auroc(truth, result.validation_probabilities),
                "validation_size": len(held),
                "best_epoch": result.best_epoch,
            }
        )
    values = np.array([r["validation_auroc"] for r in results], dtype=float)
    return {"folds": results, "auroc_mean": float(np.nanmean(values)), "auroc_sd": float(np.nanstd(values, ddof=1))}


def train_from_dataset(request: TrainRequest, progress: Progress | None = None) -> ModelCard:
    """Read the data set, optionally cross-validate, train on its train split, write the bundle."""
    # a bundle's weights are verified before minutes go into loading images
    initial = weights_provenance(Path(request.config.init_weights)) if request.config.init_weights else None
    items = assign_splits(
        read_dataset(request.source, request.layout, request.labels_csv), request.val_fraction, request.config.seed
    )
    classes = _classes(items, request.task)
    config = replace(request.config, classes=classes)
    train_items = [i for i in items if i.split == "train"]
    val_items = [i for i in items if i.split == "val"]
    if not train_items or not val_items:
        raise DatasetError(f"need training and validation images; found {len(train_items)} and {len(val_items)}")
    for name, part in (("training", train_items), ("validation", val_items)):
        if len({i.label for i in part}) < 2:
            raise DatasetError(f"the {name} split needs fractured and non-fractured images")
    preprocess = PreprocessConfig(input_size=config.input_size, tile_spacing_mm=config.tile_spacing_mm)
    started = time.monotonic()
    train_images = _load(train_items, preprocess, progress, "loading training images", request.load_workers)
    # validation scores an image as the daemon does: all its tiles, the strongest counts
    validation = load_inputs(
        val_items,
        preprocess,
        (lambda n: progress("loading validation images", n, len(val_items))) if progress else None,
        request.load_workers,
    )
    seconds = time.monotonic() - started
    LOGGER.info(
        "loaded %d training and %d validation images (%d inputs) in %.1f s, %.0f images/s, %d worker processes",
        len(train_items), len(val_items), len(train_images) + len(validation.images), seconds,
        (len(train_items) + len(val_items)) / max(seconds, 1e-9), request.load_workers,
    )  # fmt: skip
    train_targets, val_targets = _targets(train_items, classes), _targets(val_items, classes)
    boxes = _boxes(train_items + val_items, preprocess)
    request.out.mkdir(parents=True, exist_ok=True)
    cv = None
    if request.folds > 1:
        pool = train_items + val_items
        val_images = (
            validation.images
            if validation.one_per_item
            else _load(val_items, preprocess, progress, "loading validation images as folds", request.load_workers)
        )
        cv = cross_validate(
            pool,
            torch.cat([train_images, val_images]),
            torch.cat([train_targets, val_targets]),
            config,
            request.folds,
            boxes,
        )
        (request.out / "cross_validation.json").write_text(json.dumps(cv, indent=2) + "\n")
        LOGGER.info("cross-validation AUROC %.4f ± %.4f over %d folds", cv["auroc_mean"], cv["auroc_sd"], request.folds)
    checkpoint = request.out / "checkpoint.pt"
    if not request.resume and checkpoint.exists():
        checkpoint.unlink()

    def batches(epoch: int, done: int) -> None:
        if progress is not None:
            progress(f"epoch {epoch}", done, math.ceil(len(train_items) / config.batch_size))

    result = train_network(
        (train_images, train_targets),
        (validation.images, val_targets),
        config,
        checkpoint,
        batches,
        boxes=boxes[: len(train_items)] if boxes is not None else None,
        partners=twin_partners(train_items),
        validation_owners=validation.owners,
    )
    counts = {
        split: {"images": len(part), "fractured": sum(i.label for i in part)}
        for split, part in (("train", train_items), ("val", val_items))
    }
    training = {
        "data": f"{request.source} ({request.layout} layout): {counts}",
        "command": request.command,
        "seed": config.seed,
        "task": request.task,
    }
    if initial is not None:
        training["initial_weights"] = initial
    if cv is not None:
        training["cross_validation"] = cv
    synthetic = (request.source / "synth.json").is_file()
    card = build_card(
        request.name or request.out.name,
        request.version,
        config,
        result,
        val_targets.numpy(),
        training,
        SYNTH_INTENDED_USE if synthetic else GENERIC_INTENDED_USE,
        ["Not a clinical device; not for diagnostic use."]
        + (
            ["Trained on synthetic radiographs rendered from one CT; performance on real radiographs is unknown."]
            if synthetic
            else []
        ),
    )
    final = save_bundle(request.out, card, result.network)
    if checkpoint.exists():
        checkpoint.unlink()  # the bundle is the result; a finished run needs no checkpoint
    return final


# --- evaluation -----------------------------------------------------------------------------------------


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
    rises = None
    if twins is not None and binary:
        inputs, boxes = break_inputs(items, loaded)
        rises = break_rises(bundle.network, inputs, items, device, boxes)
    if twins is not None and rises is not None:
        twins["localised"] = breaks_seen(rises)
    bundle.network.cpu()
    labels = np.array([i.label for i in items], dtype=np.int64)
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
    (bundle.path / CARD_NAME).write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    LOGGER.info("operating points written to %s: doubt %.4f, positive %.4f", bundle.path, points.doubt, points.positive)
    return card


def _record(bundle: Bundle, card: ModelCard, report: dict[str, Any]) -> None:
    keys = ["data", "images", "fractured", "auroc", "auroc_ci95", "at_doubt", "at_positive", "breakdown"]
    keys += ["calibration", "twins"]
    summary: dict[str, Any] = {key: report[key] for key in keys if key in report}
    if "multiclass" in report:
        summary["multiclass"] = {k: report["multiclass"][k] for k in ("classes", "accuracy", "per_class")}
    card.metrics[f"evaluation_{report['data']['split']}"] = summary
    (bundle.path / CARD_NAME).write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")


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
