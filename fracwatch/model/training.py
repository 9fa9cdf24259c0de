"""Training: a network from a labelled tensor data set, early stopping on validation AUROC, a model bundle.

Datasets here are in-memory tensors already passed through :func:`fracwatch.pipeline.transforms.preprocess`
— the same function the daemon uses — so training and inference see identical inputs.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fracwatch.model.augmentation import Augmentation, box_masks
from fracwatch.model.bundle import (
    initial_weights_file,
)
from fracwatch.model.metrics import auroc
from fracwatch.model.networks import PRESETS, build_network
from fracwatch.model.predictor import (
    autocast,
    autocast_dtype,
    native_bfloat16,
    select_device,
)
from fracwatch.model.scores import image_probabilities, predict_tensors

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
    classes: tuple[str, ...] = ("no fracture", "fracture")  # > 2: multi-class; class 0 is "no fracture"
    init_weights: str | None = None  # a local state dict to start from (transfer learning)
    augment: bool = True
    crop: int | None = None  # train on crops this size (px of the input): fracture sites, their twins, anywhere
    crop_epochs: int | None = None  # with crop: this many epochs on crops, then whole images (None: crops only)
    # with crop_epochs: then this many epochs on larger crops (more of the anatomy around a break at a fraction of a
    # whole image's cost a step) before the whole images
    context_crop: int | None = None
    context_epochs: int = 0
    validate_every: int = 1  # in a phase before the last, validate every this many epochs (and at its end)
    # images of known spacing are scored as tiles no coarser than this (mm per input pixel; transforms.tile_grid):
    # training sees each as its tile that holds the fracture, validation scores all of them
    tile_spacing_mm: float | None = None
    # validation (and the card) divide a tiled image's strongest-tile odds by its tile count
    tile_count_correction: bool = False
    # training steps' autocast (predictor.autocast_dtype; validation and the bundle's scoring stay "auto"):
    # "auto" float16 on CUDA, float32 on a CPU; "bf16" bfloat16 on either (faster only where the CPU has native
    # bfloat16: docs/model-development.md, "Measured in the code"); "fp32" float32 everywhere
    precision: str = "auto"
    # an exponential moving average of the weights, updated after every step with this decay (None: none):
    # validation scores the average, and the average is what each phase keeps and the bundle holds
    ema_decay: float | None = None
    # in the whole-image phase after crop phases, keep the stem and first stage (``FROZEN_IN_WHOLE``) as the crops
    # trained them: no gradient flows below the second stage, so a whole-image step is cheaper
    freeze_stem: bool = False

    @property
    def outputs(self) -> int:
        """Logits of the network: 1 (binary) or one per class."""
        return 1 if len(self.classes) == 2 else len(self.classes)


@dataclass(frozen=True)
class Phase:
    """Epochs ``first``..``last`` (1-based, inclusive) trained on ``crop``-px crops (None: whole images) under
    one one-cycle schedule peaking at ``learning_rate``."""

    first: int
    last: int
    crop: int | None
    learning_rate: float


def phases(config: TrainConfig) -> list[Phase]:
    """The run's phases: one, or with ``crop_epochs`` crops first, then ``context_epochs`` on ``context_crop``-px
    crops when asked, then whole images — each phase peaking at a third of the one before (fine-tuning: the
    crop-trained weights meet ever more of the images, and the whole images every place false alarms come from).
    Phases past ``epochs`` are cut."""
    if config.crop is None or config.crop_epochs is None or config.crop_epochs >= config.epochs:
        return [Phase(1, config.epochs, config.crop, config.learning_rate)]
    stages: list[tuple[int | None, int]] = [(config.crop, config.crop_epochs)]
    if config.context_crop is not None and config.context_epochs > 0:
        stages.append((config.context_crop, config.context_epochs))
    stages.append((None, config.epochs))  # whole images: the rest
    plan, first = [], 1
    for number, (crop, count) in enumerate(stages):
        last = min(first + count - 1, config.epochs)
        plan.append(Phase(first, last, crop, config.learning_rate / 3**number))
        if last == config.epochs:
            break
        first = last + 1
    return plan


def config_problem(config: TrainConfig) -> str | None:
    """Why ``config`` cannot train as asked — checked by ``train_network`` and, before any image loads, by the
    CLI — or None."""
    if config.context_crop is not None or config.context_epochs != 0:
        if (config.context_crop is None or config.context_epochs < 1) or (
            config.crop is None or config.crop_epochs is None
        ):
            return "--context-crop and --context-epochs go together, with --crop and --crop-epochs"
        if not config.crop < config.context_crop <= config.input_size:
            return "--context-crop must be larger than --crop and at most --input-size"
    if config.freeze_stem:
        plan = phases(config)
        if len(plan) == 1 or plan[-1].crop is not None:
            return (
                "--freeze-stem applies to a whole-image phase after the crop phases: --crop-epochs (and "
                "--context-epochs) must leave some of --epochs"
            )
        if not stem_freezable(config.arch):
            return f"--freeze-stem needs a ResNet preset (its {', '.join(FROZEN_IN_WHOLE)}), not {config.arch}"
    if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
        return f"--ema must lie between 0 and 1 (got {config.ema_decay:g})"
    return None


def _averaging(network: torch.nn.Module, config: TrainConfig) -> AveragedModel | None:
    """A fresh moving average of ``network``'s weights and buffers (its first update copies them), or None."""
    if config.ema_decay is None:
        return None
    averaging = get_ema_multi_avg_fn(config.ema_decay)  # type: ignore[no-untyped-call]  # torch leaves it untyped
    return AveragedModel(network, multi_avg_fn=averaging, use_buffers=True)


# what ``freeze_stem`` keeps fixed in the whole-image phase: a ResNet's stem and first stage, the layers at the
# largest feature maps and so the costliest backward pass. Their BatchNorm statistics still follow the whole images.
FROZEN_IN_WHOLE = ("conv1", "bn1", "layer1")


def stem_freezable(arch: str) -> bool:
    """Whether preset ``arch`` is a MONAI ResNet, whose stem and first stage ``FROZEN_IN_WHOLE`` names."""
    return arch in PRESETS and PRESETS[arch][0].startswith("monai.ResNet")


def set_stem_frozen(network: torch.nn.Module, frozen: bool) -> None:
    """Fix (or free again) the parameters of ``FROZEN_IN_WHOLE``; AdamW leaves a parameter without a gradient
    as it is, weight decay included."""
    for name in FROZEN_IN_WHOLE:
        for parameter in getattr(network, name).parameters():
            parameter.requires_grad_(not frozen)


def _phase_of(epoch: int, plan: list[Phase]) -> Phase:
    return next(p for p in plan if p.first <= epoch <= p.last)


def _validates(epoch: int, phase: Phase, plan: list[Phase], every: int) -> bool:
    """Whether ``epoch`` ends with a validation: every epoch of the last phase (early stopping counts them), every
    ``every``-th of an earlier one and its last (the next phase starts from its best validated epoch)."""
    return phase is plan[-1] or epoch == phase.last or (epoch - phase.first + 1) % max(1, every) == 0


def _schedule(optimiser: torch.optim.Optimizer, phase: Phase, steps_per_epoch: int) -> Any:
    steps = (phase.last - phase.first + 1) * steps_per_epoch
    return torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=phase.learning_rate, total_steps=steps)


@dataclass
class TrainResult:
    network: torch.nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    validation_probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0))
    best_epoch: int = 0


def localisation_loss(logit_map: torch.Tensor, masks: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Cell-wise BCE of a (N, 1, h, w) logit map against box masks pooled to its cells (a cell is positive when
    the box reaches it), over the images whose every cell is known (normals, and fractures with a box);
    positive cells are weighted up by the square root of their rarity."""
    if not bool(known.any()):
        return logit_map.sum() * 0.0
    cells = torch.nn.functional.adaptive_max_pool2d(masks[known], logit_map.shape[-2:])
    logits = logit_map[known, :1]
    positives = float(cells.sum())
    ratio = (cells.numel() - positives) / max(positives, 1.0)
    weight = torch.tensor(max(1.0, ratio) ** 0.5, device=logits.device)  # √ of the imbalance: recall, not a flood
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, cells, pos_weight=weight)


def load_initial_weights(network: torch.nn.Module, path: Path) -> int:
    """Copy every tensor of a local state dict (a file, or a bundle folder's verified weights) whose name and shape
    fit (the head may differ); return how many."""
    path = initial_weights_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read initial weights {path}: {exc}") from exc
    if isinstance(state, dict) and "network" in state:
        state = state["network"]
    own = network.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise ValueError(f"no tensor of {path} fits this architecture")
    own.update(fitting)
    network.load_state_dict(own)
    LOGGER.info("initial weights: %d of %d tensors from %s", len(fitting), len(own), path)
    return len(fitting)


@dataclass
class _Inputs:
    """What one training run reads and never changes: data, loss, device, plan."""

    config: TrainConfig
    images: torch.Tensor
    labels: torch.Tensor
    validation: tuple[torch.Tensor, torch.Tensor]
    validation_owners: torch.Tensor | None
    boxes: torch.Tensor | None  # None unless the network localises (a binary logit map)
    partners: torch.Tensor | None
    loss_fn: torch.nn.Module
    device: torch.device
    dtype: torch.dtype | None
    plan: list[Phase]
    steps_per_epoch: int
    progress: Callable[[int, int], None] | None

    @property
    def truth(self) -> np.ndarray:
        return (self.validation[1] > 0).numpy().astype(np.int64)


@dataclass
class _State:
    """What one training run changes as it goes, and what a checkpoint holds."""

    network: torch.nn.Module
    optimiser: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    augment: Augmentation
    averaged: AveragedModel | None
    phase: Phase
    result: TrainResult
    best_state: dict[str, Any]
    best_auc: float = -1.0
    stale: int = 0
    first_epoch: int = 1
    scale: float = 1.0  # float16's loss scale for the next step (1.0 when the scaler is off)


def train_network(
    train: tuple[torch.Tensor, torch.Tensor],
    validation: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    checkpoint: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    boxes: torch.Tensor | None = None,
    partners: torch.Tensor | None = None,
    validation_owners: torch.Tensor | None = None,
) -> TrainResult:
    """Train with AdamW, class-balanced loss (BCE with pos_weight, or weighted cross-entropy), one-cycle schedules;
    keep the epoch with the best validation AUROC (fracture vs none) and stop after ``patience`` epochs without gain
    in the last phase (see ``phases``: with ``crop_epochs``, crops first, then whole images from the best crop
    epoch's weights; an earlier phase runs all its epochs).

    Labels are 0/1 (binary) or class indices (multi-class). With ``checkpoint``, the state is saved after every
    epoch and a run finding one there resumes from it. ``progress(epoch, batches_done)`` is called per batch.
    ``boxes`` (N, 4) — the fractures' boxes in input pixels, NaN where none — add a localisation loss for a
    binary network with a logit map (``networks.ResNetLogitMap``); other networks ignore them. ``partners``
    (N,) — each image's twin (the same image without the fracture), -1 where none — puts twins in the same batch
    under the same spatial augmentation: the one difference the batch shows between them is the fracture.
    ``validation_owners`` (M,): the validation item each of M inputs belongs to (an image's tiles), which then
    scores as its strongest input; None: one input per item. With ``config.ema_decay``, a moving average of the
    weights follows the steps (restarted at each phase) and is what validation scores and the run keeps; the
    steps' own weights are validated beside it (``val_auroc_raw`` in the history) for comparison.
    """
    torch.manual_seed(config.seed)
    device = select_device(config.device)
    network = _build(config, device)
    inputs = _prepare(train, validation, validation_owners, config, network, device, boxes, partners, progress)
    saved = _read_checkpoint(checkpoint)
    state = _initial_state(network, inputs, saved)
    if saved is not None:
        _resume(state, saved, checkpoint)
    for epoch in range(state.first_epoch, config.epochs + 1):
        _enter_phase(state, inputs, epoch)
        if state.stale >= config.patience and state.phase is inputs.plan[-1]:
            break
        record = _train_epoch(state, inputs, epoch)
        if _validates(epoch, state.phase, inputs.plan, config.validate_every):
            _validate(state, inputs, epoch, record)
        _log_epoch(state, inputs, record)
        if checkpoint is not None:
            _save_checkpoint(checkpoint, epoch, state)
    return _finish(state, inputs)


def _build(config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The preset's network on ``device`` in channels_last, from ``init_weights`` when given."""
    builder, params = PRESETS[config.arch]
    network = build_network(builder, {**params, "outputs": config.outputs}).to(device)
    # channels_last: faster on CPU (bench/training_step.py) and what tensor cores want under autocast
    network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # in place, like every Module.to
    if config.init_weights:
        load_initial_weights(network, Path(config.init_weights))
    return network


def _prepare(
    train: tuple[torch.Tensor, torch.Tensor],
    validation: tuple[torch.Tensor, torch.Tensor],
    validation_owners: torch.Tensor | None,
    config: TrainConfig,
    network: torch.nn.Module,
    device: torch.device,
    boxes: torch.Tensor | None,
    partners: torch.Tensor | None,
    progress: Callable[[int, int], None] | None,
) -> _Inputs:
    """Check the configuration against the data and the network; fix loss, precision and plan."""
    images, labels = train
    dtype = autocast_dtype(device, config.precision)
    if dtype == torch.bfloat16 and not native_bfloat16(device):
        LOGGER.warning(
            "--precision bf16 on %s without native bfloat16 (no AVX512-BF16 or AMX): emulated, several times slower "
            "than --precision fp32",
            device,
        )
    localise = boxes is not None and config.outputs == 1 and hasattr(network, "logit_map")
    if config.crop is not None and (not localise or config.crop > images.shape[-1]):
        raise ValueError(
            "--crop needs fracture boxes (a synth manifest), a binary logit-map network (--arch *-map) and a crop "
            "no larger than --input-size"
        )
    if problem := config_problem(config):
        raise ValueError(problem)
    if boxes is not None and not localise:
        LOGGER.info("boxes ignored: %s has no logit map or the task is not binary", config.arch)
    return _Inputs(
        config=config,
        images=images,
        labels=labels,
        validation=validation,
        validation_owners=validation_owners,
        boxes=boxes if localise else None,
        partners=partners,
        loss_fn=_loss(labels, config, device),
        device=device,
        dtype=dtype,
        plan=phases(config),
        steps_per_epoch=(len(images) + config.batch_size - 1) // config.batch_size,
        progress=progress,
    )


def _read_checkpoint(checkpoint: Path | None) -> dict[str, Any] | None:
    """A run's saved state, if there is one to resume.

    Read onto the CPU: the random generators' states must stay CPU byte tensors (a CUDA map_location moves
    them and the resume fails on a GPU); the network, optimiser and average copy their tensors onto the
    device as they load.
    """
    if checkpoint is None or not checkpoint.is_file():
        return None
    loaded: dict[str, Any] = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return loaded


def _initial_state(network: torch.nn.Module, inputs: _Inputs, saved: dict[str, Any] | None) -> _State:
    """Optimiser, schedule, loss scaler, generators and average for a fresh run (or the phase ``saved`` was in)."""
    config = inputs.config
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    # float16 needs its loss scaled; bfloat16 has float32's exponent range and does not
    scaler = torch.amp.GradScaler("cuda", enabled=inputs.dtype == torch.float16)
    augment = Augmentation(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult(network=network)
    best_state = copy.deepcopy(network.state_dict())
    plan = inputs.plan
    phase = plan[0] if saved is None else _phase_of(min(saved["epoch"], config.epochs), plan)
    scheduler = _schedule(optimiser, phase, inputs.steps_per_epoch)
    averaged = _averaging(network, config)
    return _State(
        network, optimiser, scheduler, scaler, generator, augment, averaged, phase, result, best_state,
        scale=scaler.get_scale(),
    )  # fmt: skip


def _resume(state: _State, saved: dict[str, Any], checkpoint: Path | None) -> None:
    """Continue a run from its checkpoint: every weight, moment, schedule step, loss scale and random state."""
    if saved["scheduler"].get("total_steps") != state.scheduler.total_steps:
        raise ValueError(
            f"{checkpoint} was made with other --epochs/--crop-epochs/--batch-size or data; resume with the same"
        )
    state.network.load_state_dict(saved["network"])
    if ("ema" in saved) != (state.averaged is not None):
        raise ValueError(f"{checkpoint} was made with{'' if 'ema' in saved else 'out'} --ema; resume with the same")
    if state.averaged is not None:
        state.averaged.load_state_dict(saved["ema"])
    state.optimiser.load_state_dict(saved["optimiser"])
    state.scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler"):  # a float16 run's loss scale: without it the resumed steps start over at 65536
        state.scaler.load_state_dict(saved["scaler"])
    state.generator.set_state(saved["generator"])
    if "augmentation" in saved:
        state.augment.set_state(saved["augmentation"])
    state.best_auc, state.best_state, state.stale = saved["best_auc"], saved["best_state"], saved["stale"]
    state.result.history, state.result.best_epoch = saved["history"], saved["best_epoch"]
    state.first_epoch = saved["epoch"] + 1
    state.scale = state.scaler.get_scale()
    LOGGER.info("resuming from %s after epoch %d", checkpoint, saved["epoch"])


def _enter_phase(state: _State, inputs: _Inputs, epoch: int) -> None:
    """At a phase boundary, start the next phase from this one's best epoch with a fresh schedule and average."""
    current = _phase_of(epoch, inputs.plan)
    if current != state.phase:
        state.phase = current
        state.network.load_state_dict(state.best_state)
        state.scheduler, state.stale = _schedule(state.optimiser, current, inputs.steps_per_epoch), 0
        state.averaged = _averaging(state.network, inputs.config)
        LOGGER.info("epoch %d: %s from here", epoch, f"{current.crop}-px crops" if current.crop else "whole images")


def _train_epoch(state: _State, inputs: _Inputs, epoch: int) -> dict[str, float]:
    """One pass over the training set in the epoch's order; returns the epoch's record (mean loss, start time)."""
    config, images = inputs.config, inputs.images
    if config.freeze_stem:  # at every epoch, so a run resumed in the whole-image phase freezes too
        set_stem_frozen(state.network, frozen=state.phase.crop is None)
    state.network.train()
    started, total = time.monotonic(), 0.0
    order = _epoch_order(len(images), inputs.partners, state.generator)
    for batch_number, start in enumerate(range(0, len(images), config.batch_size), start=1):
        batch_index = order[start : start + config.batch_size]
        total += _step(state, inputs, batch_index) * len(batch_index)
        if inputs.progress is not None:
            inputs.progress(epoch, batch_number)
    return {"epoch": epoch, "loss": total / len(images), "started": started}


def _step(state: _State, inputs: _Inputs, batch_index: torch.Tensor) -> float:
    """One optimiser step on one batch; returns its loss."""
    config, labels, boxes, device = inputs.config, inputs.labels, inputs.boxes, inputs.device
    phase = state.phase
    x, masks = _batch(
        inputs.images,
        batch_index,
        boxes,
        state.augment if config.augment else None,
        inputs.partners,
        (phase.crop, state.generator) if phase.crop is not None else None,
        device,
    )
    y = labels[batch_index].to(device)
    state.optimiser.zero_grad(set_to_none=True)
    with autocast(device, inputs.dtype):
        if masks is None:
            out = state.network(x).float()  # the loss in float32 whatever the autocast
            loss = inputs.loss_fn(out.reshape(-1), y.float()) if config.outputs == 1 else inputs.loss_fn(out, y.long())
        else:
            assert boxes is not None
            cells = state.network.logit_map(x).float()  # type: ignore[operator]
            known = (labels[batch_index] == 0) | ~torch.isnan(boxes[batch_index, 0])
            loss = inputs.loss_fn(torch.amax(cells, dim=(2, 3)).reshape(-1), y.float())
            loss = loss + localisation_loss(cells, masks, known.to(device))
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimiser)
    state.scaler.update()
    # float16: a step skipped for overflow lowers the scale, and the schedule waits for the optimiser; read
    # once per step, after the update (a read before the step made the CPU wait for the backward pass)
    previous, state.scale = state.scale, state.scaler.get_scale()
    if state.scale >= previous:
        state.scheduler.step()
    if state.averaged is not None:
        state.averaged.update_parameters(state.network)
    return float(loss.item())


def _validate(state: _State, inputs: _Inputs, epoch: int, record: dict[str, float]) -> None:
    """Score validation with the weights the run keeps (the average, with --ema); keep the best epoch."""
    config, device, (images, _) = inputs.config, inputs.device, inputs.validation
    kept = state.network if state.averaged is None else state.averaged.module
    truth = inputs.truth
    val_auc = auroc(truth, _validation_probabilities(kept, images, inputs.validation_owners, config, device))
    record["val_auroc"] = val_auc
    if state.averaged is not None:  # the steps' own weights, for comparison
        own = _validation_probabilities(state.network, images, inputs.validation_owners, config, device)
        record["val_auroc_raw"] = auroc(truth, own)
    if val_auc > state.best_auc:
        state.best_auc, state.best_state, state.stale = val_auc, copy.deepcopy(kept.state_dict()), 0
        state.result.best_epoch = epoch
    else:
        state.stale += 1


def _log_epoch(state: _State, inputs: _Inputs, record: dict[str, float]) -> None:
    """Time the epoch, add it to the history, log it (and an early stop)."""
    record["seconds"] = time.monotonic() - record.pop("started")
    state.result.history.append(record)
    LOGGER.info(
        "epoch %d: loss %.4f%s%s (%.0f s)",
        record["epoch"],
        record["loss"],
        f", validation AUROC {record['val_auroc']:.4f}" if "val_auroc" in record else "",
        f" (averaged; the steps' own weights {record['val_auroc_raw']:.4f})" if "val_auroc_raw" in record else "",
        record["seconds"],
    )
    if state.stale >= inputs.config.patience and state.phase is inputs.plan[-1]:
        LOGGER.info("early stop: no AUROC gain for %d epochs", state.stale)


def _finish(state: _State, inputs: _Inputs) -> TrainResult:
    """The best epoch's weights, on the CPU, with their validation probabilities scored there."""
    state.network.load_state_dict(state.best_state)
    result = state.result
    result.network = state.network.cpu().eval()
    result.validation_probabilities = _validation_probabilities(
        result.network, inputs.validation[0], inputs.validation_owners, inputs.config, torch.device("cpu")
    )
    return result


def _validation_probabilities(
    network: torch.nn.Module,
    images: torch.Tensor,
    owners: torch.Tensor | None,
    config: TrainConfig,
    device: torch.device,
) -> np.ndarray:
    """Each validation item's fracture probability: its inputs scored, a tiled item as its strongest tile."""
    scores = predict_tensors(network, images, device)
    return image_probabilities(scores, owners, config.tile_count_correction)[0]


def _epoch_order(count: int, partners: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """A random order of ``count`` images in which twins follow each other."""
    if partners is None:
        return torch.randperm(count, generator=generator)
    leads = [i for i in range(count) if partners[i] < 0 or i < partners[i]]  # a single, or a pair's first
    order: list[int] = []
    for k in torch.randperm(len(leads), generator=generator).tolist():
        order.append(leads[k])
        if partners[leads[k]] >= 0:
            order.append(int(partners[leads[k]]))
    return torch.tensor(order, dtype=torch.long)


def _batch(
    images: torch.Tensor,
    index: torch.Tensor,
    boxes: torch.Tensor | None,
    augment: Augmentation | None,
    partners: torch.Tensor | None = None,
    crop: tuple[int, torch.Generator] | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's images on ``device`` — cropped when asked (``(size, generator)``, see ``_crops``), augmented when
    asked (a twin pair in the batch under one draw) — and, with boxes, their box masks moved the same way."""
    x = images[index].float()
    masks = box_masks(boxes[index], images.shape[-1]) if boxes is not None else None
    if crop is not None and boxes is not None and masks is not None:
        x, masks = _crops(x, masks, index, boxes, partners, *crop)
    if device is not None:
        x, masks = x.to(device), None if masks is None else masks.to(device)
    if augment is not None:
        x, masks = augment(x, masks, _together(index, partners))
    return x.contiguous(memory_format=torch.channels_last), masks


def _crops(
    x: torch.Tensor,
    masks: torch.Tensor,
    index: torch.Tensor,
    boxes: torch.Tensor,
    partners: torch.Tensor | None,
    size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size``-px crops of a batch: a fractured image's around its box (±size/6); a twin's, half the time where
    its fractured twin's crop is (the same place without the break), else anywhere; any other image's anywhere.

    A fracture is a few pixels of a whole image: crops make every training image mostly about the break, and a
    logit-map network, being convolutional, then scores whole images with the same weights."""
    full = x.shape[-1]
    draws = torch.rand(len(index), 4, generator=generator)
    corners = (draws[:, :2] * (full - size + 1)).long()  # anywhere
    centre = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], dim=1)  # (x, y)
    jitter = (torch.rand(len(boxes), 2, generator=generator) - 0.5) * (size / 3)
    at_box = (centre + jitter - size / 2).round().clamp(0, full - size).long()  # NaN boxes: unused below
    for n, i in enumerate(index.tolist()):
        own = not bool(torch.isnan(boxes[i, 0]))
        mate = int(partners[i]) if partners is not None else -1
        if own:
            corners[n] = at_box[i]
        elif mate >= 0 and not bool(torch.isnan(boxes[mate, 0])) and draws[n, 2] < 0.5:
            corners[n] = at_box[mate]
    rows = corners[:, 1, None] + torch.arange(size)
    cols = corners[:, 0, None] + torch.arange(size)
    pick = torch.arange(len(index))[:, None, None]
    cropped = x[:, 0][pick, rows[:, :, None], cols[:, None, :]][:, None]
    cropped_masks = masks[:, 0][pick, rows[:, :, None], cols[:, None, :]][:, None]
    return cropped, cropped_masks


def _together(index: torch.Tensor, partners: torch.Tensor | None) -> list[list[int]]:
    """Batch positions grouped: a twin pair whose both images are in the batch, or one image."""
    position = {int(i): p for p, i in enumerate(index.tolist())}
    groups, seen = [], set()
    for p, i in enumerate(index.tolist()):
        if p in seen:
            continue
        mate = position.get(int(partners[i])) if partners is not None and partners[i] >= 0 else None
        group = [p] if mate is None or mate in seen else [p, mate]
        seen.update(group)
        groups.append(group)
    return groups


def _loss(labels: torch.Tensor, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    if config.outputs == 1:
        positives = float((labels > 0).sum())
        pos_weight = torch.tensor([(len(labels) - positives) / max(positives, 1.0)], device=device)
        return torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    counts = torch.bincount(labels.long(), minlength=config.outputs).float()
    weights = counts.sum() / (config.outputs * counts.clamp(min=1.0))
    return torch.nn.CrossEntropyLoss(weight=weights.to(device))


def _save_checkpoint(path: Path, epoch: int, state: _State) -> None:
    """Everything a resumed run needs to go on as the unbroken one would, written atomically."""
    temporary = path.with_suffix(".tmp")
    averaged = state.averaged
    torch.save(
        {
            **({"ema": averaged.state_dict()} if averaged is not None else {}),
            "epoch": epoch,
            "network": state.network.state_dict(),
            "optimiser": state.optimiser.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict(),  # float16's loss scale ({} when off: bfloat16, float32)
            "generator": state.generator.get_state(),
            "augmentation": state.augment.state(),
            "best_auc": state.best_auc,
            "best_state": state.best_state,
            "stale": state.stale,
            "history": state.result.history,
            "best_epoch": state.result.best_epoch,
        },
        temporary,
    )
    temporary.replace(path)  # a crash mid-save leaves the previous checkpoint intact


