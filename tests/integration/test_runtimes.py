"""`fracwatch export-runtime` gates the ONNX and bfloat16 runtimes on a test split and records them in the card;
`predict --runtime` then scores with them, and a runtime the card does not record as passed is refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fracwatch.cli import cli
from fracwatch.model.bundle import load_bundle, sha256_of
from tests.conftest import PHANTOM_MODEL

pytestmark = pytest.mark.timeout(300)


def _predict(model: Path, runtime: str, files: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["predict", "--model", str(model), "--runtime", runtime, "--json", *files])
    return result.exit_code, result.output


def test_export_runtime_gates_records_and_predict_scores_with_it(phantoms: Path, tmp_path: Path) -> None:
    model = tmp_path / "bundle"
    shutil.copytree(PHANTOM_MODEL, model)
    rows = list(csv.DictReader((phantoms / "manifest.csv").open()))
    files = [str(phantoms / r["image"]) for r in rows if r["split"] == "test"][:6]
    code, _ = _predict(model, "onnx", files)
    assert code == 1  # not exported yet: refused, nothing scored

    exported = CliRunner().invoke(cli, ["export-runtime", str(phantoms), "--model", str(model), "--json",
                                        "--calibration-images", "16"])  # fmt: skip
    assert exported.exit_code == 0, exported.output
    gates = json.loads(exported.output.strip().splitlines()[-1])
    assert set(gates) == {"torch-bf16", "onnx", "onnx-int8"}
    test_images = sum(1 for r in rows if r["split"] == "test")
    for name, gate in gates.items():
        assert gate["test_images"] == test_images and gate["source_sha256"] == load_bundle(model).card.weights.sha256
        assert gate["passed"] == (
            abs(gate["test_auroc"] - gate["reference_auroc"]) <= 0.005 and gate["max_probability_difference"] <= 0.1
        ), name
        if gate["file"] is not None:
            assert gate["passed"] and sha256_of(model / gate["file"]) == gate["sha256"]
        else:
            assert name == "torch-bf16" or not (model / "model.int8.onnx").exists()  # a failed file is not kept
    onnx = gates["onnx"]
    assert onnx["passed"] and onnx["max_probability_difference"] < 1e-4 and onnx["category_agreement"] == 1.0
    assert abs(onnx["test_auroc"] - onnx["reference_auroc"]) < 1e-9
    assert set(load_bundle(model).card.runtimes) == set(gates)  # recorded in model.json

    scored = {}
    for runtime in ("torch", "onnx", "auto"):
        code, output = _predict(model, runtime, files)
        assert code == 0, output
        scored[runtime] = [row["probability"] for row in json.loads(output)]
    assert all(abs(a - b) < 1e-4 for a, b in zip(scored["torch"], scored["onnx"], strict=True))
    assert all(abs(a - b) < 0.1 for a, b in zip(scored["torch"], scored["auto"], strict=True))
    if not gates["onnx-int8"]["passed"]:
        refused = CliRunner().invoke(cli, ["predict", "--model", str(model), "--runtime", "onnx-int8", files[0]])
        assert refused.exit_code == 1 and "records no onnx-int8 runtime that passed its gate" in refused.output
        assert len(refused.output.strip().splitlines()) == 1

    strict = CliRunner().invoke(cli, ["export-runtime", str(phantoms), "--model", str(model), "--no-int8",
                                      "--probability-tolerance", "0", "--auroc-tolerance", "0"])  # fmt: skip
    assert "onnx: test AUROC" in strict.output  # float32 ONNX may still pass a zero tolerance: no exit asserted
    assert "onnx-int8" not in load_bundle(model).card.runtimes  # --no-int8: none recorded


def test_export_runtime_refuses_a_data_set_without_its_splits(tmp_path: Path) -> None:
    folder = tmp_path / "flat"
    (folder / "fracture").mkdir(parents=True)
    (folder / "normal").mkdir()
    model = tmp_path / "bundle"
    shutil.copytree(PHANTOM_MODEL, model)
    result = CliRunner().invoke(cli, ["export-runtime", str(folder), "--model", str(model)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert load_bundle(model).card.runtimes == {} and not (model / "model.onnx").exists()
