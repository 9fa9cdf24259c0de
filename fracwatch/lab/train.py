"""``fracwatch train``: a data set in, a model bundle (weights + model card) out; k-fold cross-validation."""

from __future__ import annotations

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

from fracwatch.lab.datasets import (
    DatasetError,
    Item,
    Progress,
    assign_splits,
    chosen_tiles,
    item_grids,
    load_inputs,
    load_tensors,
    read_dataset,
    twin_partners,
)
from fracwatch.model.bundle import (
    ModelCard,
    save_bundle,
    weights_provenance,
)
from fracwatch.model.card import build_card
from fracwatch.model.metrics import (
    auroc,
)
from fracwatch.model.training import TrainConfig, train_network
from fracwatch.pipeline.transforms import PreprocessConfig, preprocess
from fracwatch.synth.phantom import render_phantom

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


def refuse_evaluation_only(source: Path) -> None:
    """A set rendered by the evaluation-only generator (``synth --family b``) is never trained on: a model that
    saw it would make its cross-generator figure meaningless."""
    described = source / "synth.json" if source.is_dir() else None
    if described is not None and described.is_file():
        try:
            family = json.loads(described.read_text()).get("family")
        except (ValueError, AttributeError):
            return
        if family == "b":
            raise DatasetError(f"{source} is an evaluation-only set (synth --family b): evaluate on it, never train")


def train_from_dataset(request: TrainRequest, progress: Progress | None = None) -> ModelCard:
    """Read the data set, optionally cross-validate, train on its train split, write the bundle."""
    refuse_evaluation_only(request.source)
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


PHANTOM_INTENDED_USE = (
    "Bootstrap model for fracwatch's pipeline and tests, trained only on 2-D procedural limb phantoms "
    "(fracwatch.synth.phantom). It has never seen a real radiograph. NOT FOR CLINICAL USE."
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
