"""Combine trained logit-map bundles into one ensemble bundle (``fracwatch ensemble``).

The members must read the same input (preprocessing) and answer the same question (class names); their maps are
averaged cell by cell (``networks.LogitMapEnsemble``). The ensemble is a bundle like any other: one card, one
weights file, one Device UID; its card lists each member's name, version, Device UID, weights checksum and
training record. Operating points are the first member's until ``fracwatch evaluate --set-operating-points``
chooses the ensemble's own on validation data — the mean map's scores are not any member's.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fracwatch.model.bundle import (
    Architecture,
    Bundle,
    BundleError,
    ModelCard,
    Weights,
    load_bundle,
    new_device_uid,
    save_bundle,
)
from fracwatch.model.networks import ArchitectureError, LogitMapEnsemble

ENSEMBLE_ARCHITECTURE = "fracwatch.LogitMapEnsemble"
POINTS_NOTE = (
    "operating points copied from the first member: choose the ensemble's own on validation data with "
    "fracwatch evaluate --set-operating-points"
)


def _members(paths: Sequence[Path]) -> list[Bundle]:
    bundles = [load_bundle(path) for path in paths]  # how many, and of which kind: LogitMapEnsemble checks
    first = bundles[0].card
    for bundle in bundles:
        card = bundle.card
        if card.preprocessing != first.preprocessing:
            raise BundleError(f"{bundle.path} preprocesses otherwise than {bundles[0].path}: {card.preprocessing}")
        if card.class_names != first.class_names:
            raise BundleError(f"{bundle.path} has classes {card.class_names}, {bundles[0].path} {first.class_names}")
        if card.architecture.name == ENSEMBLE_ARCHITECTURE:
            raise BundleError(f"{bundle.path} is an ensemble already: combine its members instead")
    return bundles


def _check_maps(network: LogitMapEnsemble, input_size: int) -> None:
    """The members' maps must line up cell for cell; a mismatch is found here, not while scoring."""
    with torch.inference_mode():
        network.logit_map(torch.zeros(1, 1, input_size, input_size))


def combine_bundles(paths: Sequence[Path], out: Path, version: str, name: str | None = None) -> ModelCard:
    """Write the ensemble of the bundles at ``paths`` to ``out`` (a new or empty folder); return its card."""
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} is not empty: the ensemble goes into a new folder")
    bundles = _members(paths)
    first = bundles[0].card
    try:
        network = LogitMapEnsemble([b.network for b in bundles])
        _check_maps(network, first.preprocessing.input_size)
    except ArchitectureError as exc:
        raise BundleError(str(exc)) from exc
    members: list[dict[str, Any]] = [
        {"name": b.card.architecture.name, "params": b.card.architecture.params} for b in bundles
    ]
    card = ModelCard(
        name=name or first.name,
        version=version,
        device_uid=new_device_uid(),
        manufacturer=first.manufacturer,
        architecture=Architecture(name=ENSEMBLE_ARCHITECTURE, params={"members": members}),
        preprocessing=first.preprocessing,
        class_names=first.class_names,
        operating_points=first.operating_points,
        weights=Weights(sha256="0" * 64),
        created=datetime.now(UTC),
        training={
            "command": " ".join(
                ["fracwatch ensemble", *map(str, paths), "--out", str(out), "--version", version]
                + (["--name", name] if name else [])
            ),
            "operating_points": POINTS_NOTE,
            "members": [_member_record(b) for b in bundles],
        },
        metrics={},
        intended_use=first.intended_use,
        clinical_use=all(b.card.clinical_use for b in bundles),
        warnings=list(dict.fromkeys(w for b in bundles for w in b.card.warnings)),
    )
    return save_bundle(out, card, network)


def _member_record(bundle: Bundle) -> dict[str, Any]:
    card = bundle.card
    return {
        "path": str(bundle.path),
        "name": card.name,
        "version": card.version,
        "device_uid": card.device_uid,
        "weights_sha256": card.weights.sha256,
        "training": card.training,
        "metrics": {k: v for k, v in card.metrics.items() if k != "history"},
    }
