"""``fracwatch export-runtime``: the runtimes other than torch float32 a bundle may score with — torch in bfloat16,
its network exported to ONNX Runtime in float32 and in int8 (calibrated on radiographs) — each held to a gate on
the test split before the card records it.

The gate, on the images as the daemon scores them (tiles, the tile-count correction): the AUROC within
``auroc_tolerance`` of the torch float32 network's on the same inputs, and no image's probability further than
``probability_tolerance`` from torch's. A runtime that misses it is recorded with its figures and ``passed``
false, so ``auto`` never picks it and asking for it by name is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from fracwatch.lab.datasets import DatasetError, Item, LoadedInputs, load_inputs, read_dataset
from fracwatch.model import runtimes
from fracwatch.model.bundle import Bundle, RuntimeGate, load_bundle, sha256_of, write_card
from fracwatch.model.metrics import auroc
from fracwatch.model.predictor import Predictor, Runtime, TorchRuntime, describe_device
from fracwatch.model.scores import image_probabilities

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportRequest:
    """What ``fracwatch export-runtime`` asks for."""

    bundle: Path
    dataset: Path
    layout: str = "auto"
    calibration_split: str = "val"
    test_split: str = "test"
    calibration_images: int = 128
    int8: bool = True
    auroc_tolerance: float = 0.005
    probability_tolerance: float = 0.1
    load_workers: int = 0


@dataclass(frozen=True)
class _TestSet:
    items: list[Item]
    loaded: LoadedInputs
    reference: np.ndarray  # per image, torch float32

    @property
    def labels(self) -> np.ndarray:
        return np.array([i.label for i in self.items])


def _items(request: ExportRequest, split: str) -> list[Item]:
    items = [i for i in read_dataset(request.dataset, request.layout) if i.split == split]
    if not items:
        raise DatasetError(f"{request.dataset} has no {split} split")
    return items


def _batches(images: torch.Tensor, size: int = 16) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start : start + size].to(torch.float32).numpy()


def image_scores(bundle: Bundle, runtime: Runtime, loaded: LoadedInputs) -> np.ndarray:
    """Every image's probability on ``runtime``: its inputs scored, the strongest kept (with the bundle's
    tile-count correction), as ``scoring.score_loaded`` does."""
    predictor = Predictor(bundle.network, "cpu", runtime=runtime)
    per_input = np.concatenate([predictor.predict_batch(torch.from_numpy(b)) for b in _batches(loaded.images)])
    return image_probabilities(per_input, loaded.owners, bundle.preprocess_config.tile_count_correction)[0]


def _categories(bundle: Bundle, probabilities: np.ndarray) -> np.ndarray:
    points = bundle.card.operating_points
    return np.digitize(probabilities, [points.doubt, points.positive])


def _gate(
    bundle: Bundle, request: ExportRequest, test: _TestSet, runtime: Runtime, file: Path | None, how: str
) -> RuntimeGate:
    scores = image_scores(bundle, runtime, test.loaded)
    gate = RuntimeGate(
        file=file.name if file is not None else None,
        sha256=sha256_of(file) if file is not None else None,
        source_sha256=bundle.card.weights.sha256,
        test_auroc=auroc(test.labels, scores),
        reference_auroc=auroc(test.labels, test.reference),
        max_probability_difference=float(np.max(np.abs(scores - test.reference))),
        category_agreement=float(np.mean(_categories(bundle, scores) == _categories(bundle, test.reference))),
        auroc_tolerance=request.auroc_tolerance,
        probability_tolerance=request.probability_tolerance,
        test_images=len(test.items),
        test_inputs=len(test.loaded.images),
        how=how,
        measured_on=describe_device(torch.device("cpu")),
        created=datetime.now(UTC),
    )
    LOGGER.info(
        "%s: test AUROC %.4f (torch %.4f), largest probability difference %.4f, %.1f %% same category: %s",
        runtime.name,
        gate.test_auroc,
        gate.reference_auroc,
        gate.max_probability_difference,
        100 * gate.category_agreement,
        "passed" if gate.passed else "FAILED its gate",
    )
    return gate


def export_runtimes(request: ExportRequest) -> dict[str, RuntimeGate]:
    """Export, quantise, gate and record; returns the card's new ``runtimes``."""
    bundle = load_bundle(request.bundle)
    config = bundle.preprocess_config
    items = _items(request, request.test_split)
    if len({i.label for i in items}) < 2:
        raise DatasetError(f"the {request.test_split} split needs fractured and non-fractured images")
    LOGGER.info("loading %d test images", len(items))
    loaded = load_inputs(items, config, workers=request.load_workers)
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    test = _TestSet(items, loaded, image_scores(bundle, TorchRuntime(bundle.network, cpu), loaded))
    gates = {
        runtimes.TORCH_BF16: _gate(
            bundle, request, test, TorchRuntime(bundle.network, cpu, torch.bfloat16), None, "torch autocast bfloat16"
        )
    }
    fp32 = bundle.path / runtimes.FILES[runtimes.ONNX]
    runtimes.export_onnx(bundle.network, fp32, config.input_size)
    made = {runtimes.ONNX: (fp32, f"float32 ONNX export of {bundle.card.weights.file}")}
    if request.int8:
        calibration_items = _items(request, request.calibration_split)[: request.calibration_images]
        calibration = load_inputs(calibration_items, config, workers=request.load_workers).images
        int8 = bundle.path / runtimes.FILES[runtimes.ONNX_INT8]
        runtimes.quantize_int8(fp32, int8, _batches(calibration))
        made[runtimes.ONNX_INT8] = (
            int8,
            f"int8 static (QDQ, per-channel weights), activation ranges from {len(calibration)} inputs of "
            f"{len(calibration_items)} {request.calibration_split} images of {request.dataset.name}",
        )
    for name, (file, how) in made.items():
        gates[name] = _gate(bundle, request, test, runtimes.OnnxRuntime(name, file, threads), file, how)
        if not gates[name].passed:  # a failed runtime's figures stay in the card; its file does not ship
            file.unlink()
            gates[name] = gates[name].model_copy(update={"file": None, "sha256": None, "how": f"{how}; file removed"})
    write_card(bundle.path, bundle.card.model_copy(update={"runtimes": gates}))
    return gates
