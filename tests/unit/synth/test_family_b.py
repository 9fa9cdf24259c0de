"""The evaluation-only generator (`synth --family b`): twins that differ only around the break, every image in
the `external` split, a box on each fractured image; `train` refuses the set and `evaluate --split external`
scores it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fracwatch.cli import cli
from tests.conftest import PHANTOM_MODEL
from tests.unit.synth.test_drr import write_ct


@pytest.fixture(scope="module")
def family_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ct, labels, structures = write_ct(tmp_path_factory.mktemp("ct"))
    out = tmp_path_factory.mktemp("famb") / "set"
    result = CliRunner().invoke(cli, ["synth", "--family", "b", "--out", str(out), "--ct", str(ct), "--labels",
                                      str(labels), "--structures", str(structures), "--poses", "4", "--per-pose", "2",
                                      "--seed", "3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_family_b_renders_twins_that_differ_only_near_the_break(family_b: Path) -> None:
    rows = list(csv.DictReader((family_b / "manifest.csv").open()))
    assert rows and {r["split"] for r in rows} == {"external"}
    assert json.loads((family_b / "synth.json").read_text())["family"] == "b"
    fractured = [r for r in rows if r["label"] == "1"]
    assert len(fractured) * 2 == len(rows)
    for row in fractured:
        twin = next(r for r in rows if r["pose"] == row["pose"] and r["label"] == "0")
        a = np.asarray(Image.open(family_b / row["image"]), dtype=np.float64)
        b = np.asarray(Image.open(family_b / twin["image"]), dtype=np.float64)
        assert a.shape == b.shape and a.dtype == b.dtype and 0 < a.max() <= 4095
        changed = np.abs(a - b) > 0
        assert changed.mean() < 0.5  # the same crop, exposure and noise field: only the break's neighbourhood
        x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 < a.shape[1] and 0 <= y0 < y1 < a.shape[0]
        assert float(row["shift_mm"]) > 0 and row["twin_of"] == "" and twin["twin_of"] == "0"


def test_family_b_is_for_evaluation_only(family_b: Path, tmp_path: Path) -> None:
    refused = CliRunner().invoke(cli, ["train", str(family_b), "--out", str(tmp_path / "m"), "--input-size", "64",
                                       "--epochs", "1"])  # fmt: skip
    assert refused.exit_code != 0 and "evaluation-only set" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "m").exists()
    out = tmp_path / "eval"
    evaluated = CliRunner().invoke(cli, ["evaluate", str(family_b), "--model", str(PHANTOM_MODEL), "--out", str(out),
                                         "--split", "external", "--bootstrap", "100"])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["split"] == "external" and report["images"] == 8 and report["fractured"] == 4
