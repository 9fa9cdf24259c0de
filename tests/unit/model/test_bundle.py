"""The model bundle loader verifies the card and the weights' checksum."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fracwatch.config import load_settings
from fracwatch.model.bundle import BundleError, load_bundle, read_card
from tests.conftest import PHANTOM_MODEL


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(load_settings().model_path, target)
    return target


def test_default_bundle_is_the_drr_model_and_says_what_it_is() -> None:
    path = load_settings().model_path
    assert path.name == "fracwatch-drr"
    bundle = load_bundle(path)
    card = bundle.card
    assert card.clinical_use is False
    assert "NOT A CLINICAL DEVICE" in card.intended_use and "one chest CT" in card.intended_use
    assert "fracwatch train" in card.intended_use  # retrain on your own data
    assert card.device_uid.startswith("2.25.")
    assert 0 <= card.operating_points.doubt <= card.operating_points.positive <= 1
    command = card.training["command"]
    assert command.startswith("fracwatch train data/synth ")  # trained on the synth set, by a recorded command
    if "--init-weights" in command:  # a continuation names what it continued, so the chain can be followed back
        assert {"version", "device_uid", "sha256"} <= set(card.training["initial_weights"])
    test = card.metrics["evaluation_test"]  # the held-out synth test split, recorded by `evaluate --record-in-card`
    low, high = test["auroc_ci95"]
    assert low <= test["auroc"] <= high and test["images"] > 500
    assert {"AP", "PA"} <= set(test["breakdown"]["view"]) and "rib" in test["breakdown"]["bone_class"]
    assert {"sensitivity", "specificity"} <= set(test["at_doubt"]) and "specificity" in test["at_positive"]
    size = card.preprocessing.input_size
    out = bundle.network(torch.zeros(1, 1, size, size))
    assert out.shape == (1, 1)
    assert sum(f.stat().st_size for f in path.iterdir()) < 30 * 2**20


def test_phantom_bundle_the_tests_use_loads() -> None:
    card = load_bundle(PHANTOM_MODEL).card
    assert card.clinical_use is False and "NOT FOR CLINICAL USE" in card.intended_use
    assert card.training["command"].startswith("fracwatch train --phantom")


def test_tampered_weights_are_refused(bundle_copy: Path) -> None:
    weights = bundle_copy / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="do not match the model card"):
        load_bundle(bundle_copy)


def test_missing_weights_are_refused(bundle_copy: Path) -> None:
    (bundle_copy / "weights.pt").unlink()
    with pytest.raises(BundleError, match="lacks its weights"):
        load_bundle(bundle_copy)


def test_incomplete_card_is_refused(bundle_copy: Path) -> None:
    card = json.loads((bundle_copy / "model.json").read_text())
    del card["operating_points"]
    (bundle_copy / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="operating_points"):
        read_card(bundle_copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no model\.json"):
        load_bundle(tmp_path)
