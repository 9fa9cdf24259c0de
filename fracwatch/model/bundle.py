"""The model bundle: ``models/<name>/`` holding the weights and ``model.json``, the model card.

The loader verifies the weights' sha256 against the card and refuses a mismatched or incomplete bundle.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationError, model_validator

from fracwatch.errors import FracwatchError
from fracwatch.model.networks import build_network
from fracwatch.pipeline.gate import GateRules
from fracwatch.pipeline.transforms import PreprocessConfig

CARD_NAME = "model.json"
WEIGHTS_NAME = "weights.pt"


class BundleError(FracwatchError):
    """The model bundle is missing, incomplete or does not match its checksum."""


class Architecture(BaseModel):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class Preprocessing(BaseModel):
    input_size: int = Field(ge=32, le=2048)
    percentile_low: float = Field(ge=0, lt=50)
    percentile_high: float = Field(gt=50, le=100)
    downsample_to: float = Field(default=2.0, ge=1.0)
    # images with a known pixel spacing are scored as tiles no coarser than this (transforms.tile_grid)
    tile_spacing_mm: float | None = Field(default=None, gt=0)
    max_tiles: int = Field(default=9, ge=1, le=64)
    tile_overlap: float = Field(default=0.25, ge=0, lt=1)
    # a tiled image's odds: its strongest tile's divided by its tile count (transforms.tile_count_corrected)
    tile_count_correction: bool = False

    def config(self) -> PreprocessConfig:
        return PreprocessConfig(**self.model_dump())


class Scope(BaseModel):
    """The out-of-scope gate's rules (pipeline.gate), versioned with the bundle; a card without them gets the
    defaults of ``GateRules``."""

    rules_version: str = GateRules.rules_version
    min_grey_levels: int = Field(default=GateRules.min_grey_levels, ge=1, le=256)
    max_dominant_share: float = Field(default=GateRules.max_dominant_share, gt=0, le=1)
    min_pattern_residual: float = Field(default=GateRules.min_pattern_residual, ge=0, lt=1)
    max_colour: float = Field(default=GateRules.max_colour, ge=0, le=1)

    def rules(self) -> GateRules:
        return GateRules(**self.model_dump())


class OperatingPoints(BaseModel):
    """Probability thresholds: ≥ positive → positive; ≥ doubt → doubt; else negative."""

    doubt: float = Field(ge=0, le=1)
    positive: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> OperatingPoints:
        if self.doubt > self.positive:
            raise ValueError("the doubt threshold must not exceed the positive threshold")
        return self


class Weights(BaseModel):
    file: str = WEIGHTS_NAME
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class RuntimeGate(BaseModel):
    """A runtime other than torch float32 (``model.runtimes``) and the gate it was held to on the test split: its
    image-level AUROC against the torch network's on the same inputs, the largest difference in any image's
    probability, and how many images kept their category. ONNX runtimes carry their file, its checksum and the
    weights it was made from; ``torch-bf16`` runs the weights themselves and has no file."""

    file: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    test_auroc: float = Field(ge=0, le=1)
    reference_auroc: float = Field(ge=0, le=1)
    max_probability_difference: float = Field(ge=0, le=1)
    category_agreement: float = Field(ge=0, le=1)
    auroc_tolerance: float = Field(ge=0, le=1)
    probability_tolerance: float = Field(ge=0, le=1)
    test_images: int = Field(ge=0)
    test_inputs: int = Field(ge=0)
    how: str = ""
    measured_on: str = ""
    created: datetime

    @property
    def passed(self) -> bool:
        """Whether it kept to its gate: AUROC within the tolerance of torch's, every image's probability within
        its own."""
        return (
            abs(self.test_auroc - self.reference_auroc) <= self.auroc_tolerance
            and self.max_probability_difference <= self.probability_tolerance
        )


class ModelCard(BaseModel):
    """Everything ``model.json`` says about the model."""

    name: str
    version: str
    device_uid: str = Field(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)
    manufacturer: str = "fracwatch project"
    architecture: Architecture
    preprocessing: Preprocessing
    scope: Scope = Field(default_factory=Scope)
    class_names: list[str] = Field(min_length=2, max_length=32)  # > 2: multi-class, class 0 = no fracture
    operating_points: OperatingPoints
    weights: Weights
    runtimes: dict[str, RuntimeGate] = Field(default_factory=dict)  # ONNX exports (model.runtimes)
    created: datetime
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    intended_use: str
    clinical_use: bool = False
    warnings: list[str] = Field(default_factory=list)


def new_device_uid() -> str:
    """A fresh UID (2.25 + UUID) identifying one trained model; every retrain gets a new one."""
    return f"2.25.{uuid.uuid4().int}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_provenance(path: Path) -> dict[str, str]:
    """Where a run's initial weights came from, for its model card: the file and its sha256 and, when the file is
    a bundle's own verified weights, that bundle's name, version and Device UID (a fine-tuned model's lineage)."""
    path = initial_weights_file(path)
    record = {"file": str(path), "sha256": sha256_of(path)}
    try:
        card = read_card(path.parent)  # no card there: a plain state dict file
    except BundleError:
        return record
    if card.weights.file == path.name and card.weights.sha256 == record["sha256"]:
        record |= {"bundle": card.name, "version": card.version, "device_uid": card.device_uid}
    return record


class Bundle:
    """A loaded, verified bundle: the card and the network in eval mode on the CPU."""

    def __init__(self, path: Path, card: ModelCard, network: torch.nn.Module) -> None:
        self.path = path
        self.card = card
        self.network = network

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return self.card.preprocessing.config()

    @property
    def scope(self) -> GateRules:
        """What the bundle scores at all: the gate's rules (``pipeline.gate``)."""
        return self.card.scope.rules()

    def category(self, probability: float) -> str:
        """positive / doubt / negative by the card's operating points."""
        points = self.card.operating_points
        if probability >= points.positive:
            return "positive"
        if probability >= points.doubt:
            return "doubt"
        return "negative"


def read_card(path: Path) -> ModelCard:
    """Read and validate ``model.json`` in the bundle directory ``path``."""
    card_path = path / CARD_NAME
    if not path.is_dir():
        raise BundleError(f"model bundle {path} is not a directory")
    if not card_path.is_file():
        raise BundleError(f"model bundle {path} has no {CARD_NAME}")
    try:
        return ModelCard.model_validate(json.loads(card_path.read_text()))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{card_path} is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BundleError(f"{card_path} is incomplete or invalid: {problems}") from exc


def verified_weights(path: Path) -> tuple[ModelCard, Path]:
    """The card of the bundle at ``path`` and its weights file, whose sha256 matches the card's; raises
    :class:`BundleError` with the reason."""
    card = read_card(path)
    weights = path / card.weights.file
    if not weights.is_file():
        raise BundleError(f"model bundle {path} lacks its weights file {card.weights.file}")
    actual = sha256_of(weights)
    if actual != card.weights.sha256:
        raise BundleError(
            f"weights {weights.name} do not match the model card (sha256 {actual[:12]}…, card says "
            f"{card.weights.sha256[:12]}…): refusing a mismatched bundle"
        )
    for name, runtime in card.runtimes.items():
        _verify_runtime(path, name, runtime, card.weights.sha256)
    return card, weights


def _verify_runtime(path: Path, name: str, runtime: RuntimeGate, weights_sha256: str) -> None:
    """A runtime the card records must come from the card's weights, and its file (if any) be there and match its
    checksum."""
    if runtime.source_sha256 != weights_sha256:
        raise BundleError(
            f"the {name} runtime in {path} was made from other weights (sha256 {runtime.source_sha256[:12]}…) than "
            f"the bundle's; measure it again (fracwatch export-runtime) or remove it from the card"
        )
    if runtime.file is None:
        return
    file = path / runtime.file
    if not file.is_file():
        raise BundleError(f"model bundle {path} lacks its {name} runtime file {runtime.file}")
    actual = sha256_of(file)
    if actual != runtime.sha256:
        raise BundleError(
            f"{runtime.file} does not match the model card (sha256 {actual[:12]}…, card says "
            f"{(runtime.sha256 or 'none')[:12]}…): refusing a mismatched bundle"
        )


def initial_weights_file(path: Path) -> Path:
    """``--init-weights``: a state dict file as given, or a bundle folder's own verified weights file."""
    return verified_weights(path)[1] if path.is_dir() else path


def load_bundle(path: Path) -> Bundle:
    """Load and verify the bundle at ``path``; raises :class:`BundleError` with the reason."""
    card, weights = verified_weights(path)
    network = build_network(card.architecture.name, card.architecture.params)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        network.load_state_dict(state, strict=True)
    except Exception as exc:
        raise BundleError(f"weights in {path} do not fit {card.architecture.name}: {exc}") from exc
    network.eval()
    return Bundle(path, card, network)


def save_bundle(path: Path, card: ModelCard, network: torch.nn.Module) -> ModelCard:
    """Write weights and card to ``path``; the card's checksum is computed here. Returns the final card."""
    path.mkdir(parents=True, exist_ok=True)
    weights = path / card.weights.file
    torch.save(network.state_dict(), weights)
    digest = sha256_of(weights)
    kept = {name: entry for name, entry in card.runtimes.items() if entry.source_sha256 == digest}  # not retrained
    final = card.model_copy(update={"weights": Weights(file=card.weights.file, sha256=digest), "runtimes": kept})
    write_card(path, final)
    return final


def write_card(path: Path, card: ModelCard) -> None:
    """``model.json`` of the bundle at ``path``."""
    (path / CARD_NAME).write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
