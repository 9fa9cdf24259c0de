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


def test_the_shipped_bundle_records_its_runtimes_gates_and_refuses_a_tampered_onnx_file(bundle_copy: Path) -> None:
    """The default bundle's card records the runtimes measured against torch on its test split; the ONNX file
    it ships is checked like the weights, and a runtime made from other weights is refused."""
    card = read_card(bundle_copy)
    assert {"torch-bf16", "onnx"} <= set(card.runtimes)
    for name, gate in card.runtimes.items():
        assert gate.source_sha256 == card.weights.sha256 and gate.test_images > 500
        assert gate.test_inputs >= gate.test_images  # whole chests count their tiles
        assert gate.passed == (
            abs(gate.test_auroc - gate.reference_auroc) <= gate.auroc_tolerance
            and gate.max_probability_difference <= gate.probability_tolerance
        ), name
        assert (gate.file is not None) == (bundle_copy / (gate.file or "-")).is_file()
    assert card.runtimes["onnx"].passed and card.runtimes["onnx"].file == "model.onnx"
    load_bundle(bundle_copy)

    onnx = bundle_copy / "model.onnx"
    original = onnx.read_bytes()
    onnx.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(BundleError, match=r"model\.onnx does not match the model card"):
        load_bundle(bundle_copy)
    onnx.unlink()
    with pytest.raises(BundleError, match=r"lacks its onnx runtime file model\.onnx"):
        load_bundle(bundle_copy)
    onnx.write_bytes(original)
    raw = json.loads((bundle_copy / "model.json").read_text())
    raw["runtimes"]["onnx"]["source_sha256"] = "0" * 64
    (bundle_copy / "model.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="made from other weights"):
        load_bundle(bundle_copy)


def test_saving_new_weights_drops_the_runtimes_made_from_the_old(bundle_copy: Path) -> None:
    from fracwatch.model.bundle import save_bundle

    bundle = load_bundle(bundle_copy)
    assert bundle.card.runtimes
    with torch.no_grad():
        next(bundle.network.parameters()).add_(0.01)  # retrained, say
    card = save_bundle(bundle_copy, bundle.card, bundle.network)
    assert card.runtimes == {} and read_card(bundle_copy).runtimes == {}
    load_bundle(bundle_copy)  # the stale model.onnx is no longer the card's: nothing refers to it
