"""The model lifecycle on small, fast data: synth phantoms → train → bundle → predict → evaluate; every data set
layout; k-fold; resume; transfer; a multi-class task; Grad-CAM shape and range."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fracwatch.cli import cli
from fracwatch.lab.datasets import (
    SPACING_BANDS,
    DatasetError,
    Item,
    chosen_tiles,
    input_boxes,
    input_spacing_band,
    item_grids,
    load_inputs,
    load_tensors,
    read_dataset,
    twin_partners,
)
from fracwatch.lab.evaluate import break_rises, breaks_seen, twin_comparison, write_scores
from fracwatch.model import training
from fracwatch.model.augmentation import Augmentation, box_masks
from fracwatch.model.bundle import load_bundle, sha256_of
from fracwatch.model.gradcam import grad_cam
from fracwatch.model.networks import PRESETS, build_network
from fracwatch.model.predictor import (
    PRECISIONS,
    autocast_dtype,
    describe_device,
    has_amx,
    native_bfloat16,
    select_device,
)
from fracwatch.model.scores import image_probabilities, strongest_inputs
from fracwatch.model.training import (
    Phase,
    TrainConfig,
    TrainResult,
    _batch,
    _epoch_order,
    config_problem,
    localisation_loss,
    phases,
    train_network,
)
from fracwatch.pipeline.transforms import PreprocessConfig
from fracwatch.synth.phantom import render_phantom, to_stored
from tests import dicomgen

pytestmark = pytest.mark.timeout(300)

FAST = ["--input-size", "64", "--batch-size", "16", "--epochs", "1"]


def png(path: Path, fractured: bool, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(render_phantom(seed, fractured, (96, 96)).image, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def test_train_one_epoch_then_predict_and_evaluate(phantoms: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    trained = CliRunner().invoke(cli, ["train", str(phantoms), "--out", str(model), *FAST, "--version", "9.9.9"])
    assert trained.exit_code == 0, trained.output
    bundle = load_bundle(model)
    card = bundle.card
    assert card.version == "9.9.9" and card.class_names == ["no fracture", "fracture"]
    assert card.training["command"].startswith("fracwatch ") and "train" in card.training["command"]
    assert "Not a clinical device" in " ".join(card.warnings) and not (model / "checkpoint.pt").exists()
    assert card.metrics["history"][0]["epoch"] == 1 and 0.0 <= card.metrics["validation_auroc"] <= 1.0

    rows = list(csv.DictReader((phantoms / "manifest.csv").open()))
    files = [str(phantoms / r["image"]) for r in rows[:3]]
    predicted = CliRunner().invoke(cli, ["predict", "--model", str(model), "--json", "--cam", str(tmp_path / "cam"),
                                         *files])  # fmt: skip
    assert predicted.exit_code == 0, predicted.output
    answers = json.loads(predicted.output)
    assert [a["file"] for a in answers] == files
    assert all(0.0 <= a["probability"] <= 1.0 and a["model_version"] == "9.9.9" for a in answers)
    assert all(Path(a["cam"]).is_file() for a in answers)

    report_dir = tmp_path / "eval"
    evaluated = CliRunner().invoke(
        cli, ["evaluate", str(phantoms), "--model", str(model), "--out", str(report_dir), "--bootstrap", "200"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((report_dir / "report.json").read_text())
    test_rows = [r for r in rows if r["split"] == "test"]
    assert report["data"]["split"] == "test" and report["images"] == len(test_rows)
    assert report["fractured"] == sum(int(r["label"]) for r in test_rows)
    low, high = report["auroc_ci95"]
    assert low <= report["auroc"] <= high
    for point in ("at_doubt", "at_positive"):
        at = report[point]
        assert at["tp"] + at["fp"] + at["tn"] + at["fn"] == report["images"]
        assert {"sensitivity", "specificity", "accuracy", "precision", "f1"} <= set(at)
    for picture in ("roc.png", "pr.png", "calibration.png", "confusion.png"):
        with Image.open(report_dir / picture) as image:
            assert image.width > 200 and image.height > 200
    assert report["calibration"]["bins"] and "bone_class" in report["breakdown"]
    # phantoms: 0.2 mm pixels, 256-384 px images at a 64-px input → 0.8-1.2 mm per input pixel; no twins
    bands = report["breakdown"]["input_mm_per_px"]
    assert set(bands) == {"≥ 0.8 mm"} and bands["≥ 0.8 mm"]["images"] == report["images"]
    assert "twins" not in report
    with (report_dir / report["files"]["scores"]).open(newline="") as handle:
        scored = list(csv.DictReader(handle))
    assert sorted(r["path"] for r in scored) == sorted(r["image"] for r in test_rows)
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in scored) and "break_rise_logits" not in scored[0]

    chosen = CliRunner().invoke(cli, ["evaluate", str(phantoms), "--model", str(model), "--out", str(tmp_path / "v"),
                                      "--split", "val", "--set-operating-points", "--doubt-sensitivity", "0.9",
                                      "--record-in-card", "--bootstrap", "100"])  # fmt: skip
    assert chosen.exit_code == 0, chosen.output
    updated = load_bundle(model).card  # weights unchanged, so the checksum still holds
    val = json.loads((tmp_path / "v" / "report.json").read_text())
    assert updated.operating_points.model_dump() == val["operating_points"]
    assert val["at_doubt"]["sensitivity"] >= 0.9
    assert updated.metrics["operating_points_chosen_on"] == "val" and "evaluation_val" in updated.metrics
    # The card's figures at its operating points are those of the points now in force, not training's.
    assert updated.metrics["at_doubt"] == val["at_doubt"] and updated.metrics["at_positive"] == val["at_positive"]

    # Tiles: phantoms at 0.8-1.2 mm per whole-image input pixel, scored as 64-px tiles at 0.5 mm; the tile
    # spacing is chosen with the operating points and stored with them.
    tiled = CliRunner().invoke(cli, ["evaluate", str(phantoms), "--model", str(model), "--out", str(tmp_path / "t"),
                                     "--split", "val", "--set-operating-points", "--tile-spacing-mm", "0.5",
                                     "--bootstrap", "100"])  # fmt: skip
    assert tiled.exit_code == 0, tiled.output
    tiled_report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert tiled_report["images"] == val["images"] and set(tiled_report["breakdown"]["input_mm_per_px"]) == {
        "0.4-0.8 mm"
    }
    retiled = load_bundle(model).card
    assert retiled.preprocessing.tile_spacing_mm == 0.5
    assert retiled.operating_points.model_dump() == tiled_report["operating_points"]
    refused = CliRunner().invoke(cli, ["evaluate", str(phantoms), "--model", str(model), "--out", str(tmp_path / "r"),
                                       "--tile-spacing-mm", "0", "--record-in-card"])  # fmt: skip
    assert refused.exit_code != 0 and "--set-operating-points" in refused.output
    assert load_bundle(model).card == retiled  # nothing written

    # The tile-count correction: each image's score is its strongest tile's with the odds divided by its tile
    # count; chosen and stored with the operating points like the spacing.
    counted = CliRunner().invoke(cli, ["evaluate", str(phantoms), "--model", str(model), "--out", str(tmp_path / "n"),
                                       "--split", "val", "--set-operating-points", "--tile-count-correction",
                                       "--bootstrap", "100"])  # fmt: skip
    assert counted.exit_code == 0, counted.output
    recounted = load_bundle(model).card
    assert recounted.preprocessing.tile_count_correction and recounted.preprocessing.tile_spacing_mm == 0.5
    counted_report = json.loads((tmp_path / "n" / "report.json").read_text())
    assert recounted.operating_points.model_dump() == counted_report["operating_points"]
    val_items = [i for i in read_dataset(phantoms) if i.split == "val"]
    grids = item_grids(val_items, recounted.preprocessing.config())
    tiles = {str(i.path.relative_to(phantoms)): len(g.origins) for i, g in zip(val_items, grids, strict=True) if g}
    before, after = (
        {r["path"]: float(r["probability"]) for r in csv.DictReader((tmp_path / d / "scores.csv").open())}
        for d in ("t", "n")
    )
    assert set(tiles) == set(before) == set(after)
    for path, p in before.items():
        assert abs(after[path] - p / (p + tiles[path] * (1 - p))) < 1e-5  # the report's 6 decimals


def test_every_dataset_layout_loads(tmp_path: Path) -> None:
    fracatlas = tmp_path / "FracAtlas" / "images"
    for n in range(2):
        png(fracatlas / "Fractured" / f"f{n}.png", True, n)
        png(fracatlas / "Non_fractured" / f"n{n}.png", False, 10 + n)
    items = read_dataset(tmp_path / "FracAtlas")
    assert sorted((i.path.name, i.label) for i in items) == [("f0.png", 1), ("f1.png", 1), ("n0.png", 0), ("n1.png", 0)]

    kaggle = tmp_path / "kaggle"
    for split in ("train", "val", "test"):
        png(kaggle / split / "fractured" / "a.png", True, 20)
        png(kaggle / split / "not fractured" / "b.png", False, 21)
    items = read_dataset(kaggle)
    assert {(i.split, i.label) for i in items} == {(s, lab) for s in ("train", "val", "test") for lab in (0, 1)}

    table = tmp_path / "labels.csv"
    png(tmp_path / "pics" / "x.png", True, 30)
    png(tmp_path / "pics" / "y.png", False, 31)
    table.write_text("path,label\npics/x.png,fractured\npics/y.png,0\n")
    assert [(i.path.name, i.label) for i in read_dataset(table)] == [("x.png", 1), ("y.png", 0)]

    dicom_dir = tmp_path / "dicom"
    dicom_dir.mkdir()
    uids = []
    for n, fractured in enumerate((True, False)):
        ds = dicomgen.image(dicomgen.StudyIds(), rows=96, columns=96, seed=n)
        ds.PixelData = to_stored(render_phantom(40 + n, fractured, (96, 96)).image).tobytes()
        dicomgen.save(ds, dicom_dir / f"{n}.dcm")
        uids.append((ds.SOPInstanceUID, int(fractured)))
    dicom_labels = tmp_path / "dicom_labels.csv"
    dicom_labels.write_text("sop_instance_uid,label\n" + "".join(f"{u},{lab}\n" for u, lab in uids))
    items = read_dataset(dicom_dir, labels_csv=dicom_labels)
    assert sorted(i.label for i in items) == [0, 1] and all(i.group == dicomgen.StudyIds().patient_id for i in items)

    with pytest.raises(DatasetError, match="--labels"):
        read_dataset(dicom_dir)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\npics/x.png,maybe\n")
    with pytest.raises(DatasetError, match="neither fractured nor"):
        read_dataset(bad)
    gone = tmp_path / "gone.csv"
    gone.write_text("path,label\npics/nothere.png,1\n")
    with pytest.raises(DatasetError, match="do not exist"):
        read_dataset(gone)

    trained = CliRunner().invoke(cli, ["train", str(kaggle), "--out", str(tmp_path / "m"), *FAST, "--workers", "2"])
    assert trained.exit_code == 0, trained.output  # the Kaggle train/val folders are used as given
    assert load_bundle(tmp_path / "m").card.metrics["validation_size"] == 2


def test_images_load_the_same_in_worker_processes(phantoms: Path, tmp_path: Path) -> None:
    items = read_dataset(phantoms)[:40]
    config = PreprocessConfig(input_size=64)
    seen: list[int] = []
    alone = load_tensors(items, config)
    together = load_tensors(items, config, progress=seen.append, workers=2)
    assert together.shape == (40, 1, 64, 64) and together.dtype == torch.float16
    assert torch.equal(alone, together) and seen[-1] == 40 and seen == sorted(seen)

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    with pytest.raises(DatasetError, match=r"broken\.png"):
        load_tensors([*items[:20], replace(items[0], path=broken), *items[20:]], config, workers=2)
    with pytest.raises(ValueError, match="num_workers"):
        load_tensors(items, config, workers=-1)

    reports = []
    for workers in ("0", "2"):
        out = tmp_path / f"eval-{workers}"
        command = ["evaluate", str(phantoms), "--model", "models/fracwatch-phantom", "--out", str(out)]
        evaluated = CliRunner().invoke(cli, [*command, "--bootstrap", "100", "--workers", workers])
        assert evaluated.exit_code == 0, evaluated.output
        reports.append(json.loads((out / "report.json").read_text()))
    assert reports[0]["auroc"] == reports[1]["auroc"] and reports[0]["images"] == reports[1]["images"] > 0


def interrupted_in_epoch_2_then_resumed(
    config: TrainConfig, checkpoint: Path, images: torch.Tensor, labels: torch.Tensor
) -> TrainResult:
    """A two-epoch run (validated on the first 8 images) interrupted in epoch 2, then resumed from its checkpoint,
    which holds epoch 1: the resumed run's history has both epochs."""

    def interrupt(epoch: int, _batch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_network((images, labels), (images[:8], labels[:8]), config, checkpoint, interrupt)
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 1
    resumed = train_network((images, labels), (images[:8], labels[:8]), config, checkpoint)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    return resumed


def test_cross_validation_resume_and_transfer(phantoms: Path, tmp_path: Path) -> None:
    model = tmp_path / "cv"
    result = CliRunner().invoke(cli, ["train", str(phantoms), "--out", str(model), *FAST, "--folds", "2"])
    assert result.exit_code == 0, result.output
    cv = json.loads((model / "cross_validation.json").read_text())
    assert len(cv["folds"]) == 2 and "± " in result.output
    assert cv["auroc_mean"] == pytest.approx(np.mean([f["validation_auroc"] for f in cv["folds"]]))
    assert load_bundle(model).card.training["cross_validation"]["auroc_sd"] == cv["auroc_sd"]

    # transfer: start from the trained weights (a local file; nothing downloads)
    weights = tmp_path / "start.pt"
    torch.save(load_bundle(model).network.state_dict(), weights)
    transfer = CliRunner().invoke(cli, ["train", str(phantoms), "--out", str(tmp_path / "t"), *FAST,
                                        "--init-weights", str(weights)])  # fmt: skip
    assert transfer.exit_code == 0, transfer.output
    assert load_bundle(tmp_path / "t").card.training["initial_weights"] == {"file": str(weights),
                                                                             "sha256": sha256_of(weights)}  # fmt: skip
    # from a bundle (its folder or its own weights file): the card names the bundle it was fine-tuned from
    parent = load_bundle(model).card
    for n, start in enumerate((model, model / "weights.pt")):
        tuned = CliRunner().invoke(cli, ["train", str(phantoms), "--out", str(tmp_path / f"t{n}"), *FAST,
                                         "--init-weights", str(start)])  # fmt: skip
        assert tuned.exit_code == 0, tuned.output
        lineage = load_bundle(tmp_path / f"t{n}").card.training["initial_weights"]
        assert lineage == {"file": str(model / "weights.pt"), "sha256": parent.weights.sha256, "bundle": parent.name,
                           "version": parent.version, "device_uid": parent.device_uid}  # fmt: skip
    tampered = tmp_path / "tampered"
    shutil.copytree(model, tampered)
    (tampered / "weights.pt").write_bytes((tampered / "weights.pt").read_bytes() + b"x")
    refused = CliRunner().invoke(cli, ["train", str(phantoms), "--out", str(tmp_path / "w0"), *FAST,
                                       "--init-weights", str(tampered)])  # fmt: skip
    assert refused.exit_code == 1 and "do not match the model card" in refused.output
    assert not (tmp_path / "w0").exists()  # refused before anything was loaded or written
    missing = CliRunner().invoke(cli, ["train", str(phantoms), "--out", str(tmp_path / "w1"), *FAST,
                                       "--init-weights", str(tmp_path / "nowhere.pt")])  # fmt: skip
    assert missing.exit_code == 2 and "does not exist" in missing.output
    wrong = tmp_path / "wrong.pt"
    torch.save({"nothing": torch.zeros(3)}, wrong)
    refused = CliRunner().invoke(cli, ["train", str(phantoms), "--out", str(tmp_path / "w"), *FAST,
                                       "--init-weights", str(wrong)])  # fmt: skip
    assert refused.exit_code == 1 and "no tensor" in refused.output

    # resume: a run interrupted in epoch 2 continues there from its checkpoint (saved after epoch 1)
    config = TrainConfig(input_size=64, batch_size=16, epochs=2)
    images, labels = torch.rand(24, 1, 64, 64), torch.tensor([0.0, 1.0] * 12)
    checkpoint = tmp_path / "ck.pt"
    resumed = interrupted_in_epoch_2_then_resumed(config, checkpoint, images, labels)
    # the checkpoint carries every random stream (order, crops, augmentation): resuming changes nothing — epoch 2's
    # loss (its batches, augmented) as well as the weights kept (the best epoch's, which may be epoch 1's)
    whole = train_network((images, labels), (images[:8], labels[:8]), config)
    assert [h["loss"] for h in whole.history] == [h["loss"] for h in resumed.history]
    for name, tensor in whole.network.state_dict().items():
        assert torch.equal(tensor, resumed.network.state_dict()[name]), name
    with pytest.raises(ValueError, match="resume with the same"):
        train_network((images, labels), (images[:8], labels[:8]), replace(config, epochs=3), checkpoint)


def test_multiclass_bone_task(tmp_path: Path) -> None:
    rows = ["path,label,class,group"]
    for n in range(36):
        kind = ("none", "rib", "clavicle")[n % 3]
        picture = png(tmp_path / "pics" / f"{n}.png", kind != "none", 200 + n)
        rows.append(f"pics/{picture.name},{int(kind != 'none')},{kind},g{n // 2}")
    table = tmp_path / "set.csv"
    table.write_text("\n".join(rows) + "\n")
    model = tmp_path / "bone"
    result = CliRunner().invoke(cli, ["train", str(table), "--out", str(model), *FAST, "--task", "bone",
                                      "--val-fraction", "0.3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    bundle = load_bundle(model)
    assert bundle.card.class_names == ["no fracture", "clavicle", "rib"]
    report_dir = tmp_path / "eval"
    evaluated = CliRunner().invoke(cli, ["evaluate", str(table), "--model", str(model), "--out", str(report_dir),
                                         "--bootstrap", "100"])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    multiclass = json.loads((report_dir / "report.json").read_text())["multiclass"]
    assert multiclass["classes"] == ["no fracture", "clavicle", "rib"]
    assert np.array(multiclass["confusion_matrix"]).sum() == 36
    assert set(multiclass["per_class"]) == {"no fracture", "clavicle", "rib"}
    assert (report_dir / "confusion_multiclass.png").is_file()
    # the daemon's predictor reads P(fracture) = 1 - P(no fracture) from a multi-class bundle
    scored = CliRunner().invoke(cli, ["predict", "--model", str(model), "--json", str(tmp_path / "pics" / "1.png")])
    assert scored.exit_code == 0 and 0.0 <= json.loads(scored.output)[0]["probability"] <= 1.0


def test_boxes_supervise_a_logit_map_network(phantoms: Path, tmp_path: Path) -> None:
    items = read_dataset(phantoms)
    fractured = [i for i in items if i.label == 1]
    assert fractured and all(i.box is not None and i.size is not None for i in fractured)
    assert all(i.box is None for i in items if i.label == 0)

    # a synth manifest's break-site box (site_x0..site_y1) is preferred to the whole change's box (x0..y1)
    site_set = tmp_path / "site"
    png(site_set / "images" / "f.png", True, 1)
    png(site_set / "images" / "g.png", True, 2)
    fields = ["image", "label", "split", "x0", "y0", "x1", "y1", "site_x0", "site_y0", "site_x1", "site_y1"]
    with (site_set / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        writer.writerow(["images/f.png", 1, "train", 10, 10, 80, 80, 20, 30, 40, 50])
        writer.writerow(["images/g.png", 1, "train", 10, 10, 80, 80, "", "", "", ""])
    site_items = read_dataset(site_set)
    assert [i.box for i in site_items] == [(20.0, 30.0, 40.0, 50.0), (10.0, 10.0, 80.0, 80.0)]

    # boxes follow preprocess's aspect-preserving resize and centred pad
    wide = Item(path=Path("w.png"), label=1, box=(0.0, 0.0, 200.0, 100.0), size=(200, 100))
    part = Item(path=Path("p.png"), label=1, box=(50.0, 25.0, 100.0, 75.0), size=(200, 100))
    none = Item(path=Path("n.png"), label=0)
    boxes = input_boxes([wide, part, none], 128)
    assert boxes[0].tolist() == [0.0, 32.0, 128.0, 96.0] and boxes[1].tolist() == [32.0, 48.0, 64.0, 80.0]
    assert torch.isnan(boxes[2]).all()
    masks = box_masks(boxes, 128)
    assert masks.shape == (3, 1, 128, 128) and masks[0].sum() == 128 * 64 and masks[2].sum() == 0

    # augmentation moves a mask exactly as it moves the image, each image of a batch its own way
    batch = masks[1:2].repeat(6, 1, 1, 1)
    image, mask = Augmentation(0)(batch.clone(), batch)
    assert mask is not None and mask.shape == batch.shape and set(mask.unique().tolist()) <= {0.0, 1.0}
    for n in range(6):
        assert ((image[n, 0] > 0.5) == (mask[n, 0] > 0.5)).float().mean() > 0.98
    moved = {tuple(m.flatten().nonzero().flatten()[[0, -1]].tolist()) for m in mask}
    assert len(moved) > 1  # the images were moved differently: the agreement above is not the identity's
    # never upside down: a mark at the top stays in the top half, whatever the draw
    top = torch.zeros(32, 1, 64, 64)
    top[:, :, 4:10, 28:36] = 1.0
    lifted, _ = Augmentation(1)(top)
    assert bool((lifted[:, 0, :32].sum(dim=(1, 2)) > lifted[:, 0, 32:].sum(dim=(1, 2))).all())

    # the localisation loss prefers a map that is high where the box is
    cells = torch.full((2, 1, 4, 4), -4.0)
    right, wrong = cells.clone(), cells.clone()
    right[1, 0, 1:3, 1] = 4.0  # the second image's box covers columns 1, rows 1-2 of a 4 × 4 map
    wrong[1, 0, 3, 3] = 4.0
    known = torch.tensor([True, True])
    pair = box_masks(torch.stack([boxes[2], boxes[1]]), 128)
    assert localisation_loss(right, pair, known) < localisation_loss(wrong, pair, known)
    assert localisation_loss(wrong, pair, torch.tensor([False, False])) == 0.0

    model = tmp_path / "map"
    trained = CliRunner().invoke(cli, ["train", str(phantoms), "--out", str(model), *FAST, "--arch", "tiny-resnet-map"])
    assert trained.exit_code == 0, trained.output
    assert "carry a box" in trained.output
    bundle = load_bundle(model)
    assert bundle.card.architecture.name == "monai.ResNetLogitMap"

    # crop training: a logit-map network on 32-px crops, validated (and later used) on whole 64-px images
    crop_args = ["--out", str(tmp_path / "crop"), *FAST, "--arch", "tiny-resnet-map", "--crop", "32"]
    cropped = CliRunner().invoke(cli, ["train", str(phantoms), *crop_args, "--crop-epochs", "1", "--val-every", "2"])
    assert cropped.exit_code == 0, cropped.output
    crop_card = load_bundle(tmp_path / "crop").card
    assert "--crop 32 --crop-epochs 1 --val-every 2" in crop_card.training["command"]
    assert crop_card.training["config"]["validate_every"] == 2
    alone = CliRunner().invoke(cli, ["train", str(phantoms), "--out", str(tmp_path / "n"), *FAST, "--crop-epochs", "1"])
    assert alone.exit_code != 0 and "--crop-epochs needs --crop" in alone.output
    refused = CliRunner().invoke(cli, ["train", str(phantoms), "--out", str(tmp_path / "no"), *FAST, "--crop", "32"])
    assert refused.exit_code != 0 and "logit-map" in refused.output
    picture = str(phantoms / "images" / "p0000_i00.png")
    cam_dir = str(tmp_path / "c")
    scored = CliRunner().invoke(cli, ["predict", "--model", str(model), "--json", "--cam", cam_dir, picture])
    assert scored.exit_code == 0, scored.output
    assert Path(json.loads(scored.output)[0]["cam"]).is_file()


def spy_batch_sides(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the side of the images of every training batch ``training._batch`` makes, in order."""
    sides: list[int] = []
    real_batch = training._batch

    def batch_spy(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = real_batch(*args, **kwargs)  # type: ignore[arg-type]
        sides.append(out[0].shape[-1])
        return out

    monkeypatch.setattr(training, "_batch", batch_spy)
    return sides


def test_crop_epochs_then_whole_images_and_resume_across_the_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrainConfig(arch="tiny-resnet-map16", input_size=64, batch_size=8, epochs=3, crop=32, crop_epochs=2,
                         learning_rate=3e-3, patience=1)  # fmt: skip
    assert phases(config) == [Phase(1, 2, 32, 3e-3), Phase(3, 3, None, 1e-3)]
    assert phases(replace(config, crop_epochs=None)) == [Phase(1, 3, 32, 3e-3)]
    assert phases(replace(config, crop_epochs=3)) == [Phase(1, 3, 32, 3e-3)]

    images, labels = torch.rand(16, 1, 64, 64), torch.tensor([0.0, 1.0] * 8)
    boxes = torch.tensor([[float("nan")] * 4, [10.0, 10.0, 20.0, 20.0]] * 8)
    seen: list[tuple[int, int]] = []  # (epoch, side of the images a training batch held)
    sizes = spy_batch_sides(monkeypatch)

    def record(epoch: int, _batch: int) -> None:
        seen.append((epoch, sizes[-1]))
        if epoch == 3 and interrupt:
            raise KeyboardInterrupt

    # validation without a fracture: AUROC undefined, never a gain — patience 1 would stop a one-phase run after
    # epoch 1; the crop phase runs all its epochs and the whole-image phase starts afresh
    validation = (images[::2], labels[::2])
    checkpoint, interrupt = tmp_path / "ck.pt", True
    with pytest.raises(KeyboardInterrupt):
        train_network((images, labels), validation, config, checkpoint, record, boxes=boxes)
    assert set(seen) == {(1, 32), (2, 32), (3, 64)}  # every batch: crops, crops, then whole images
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 2
    interrupt, seen[:] = False, []  # a run interrupted in the whole-image phase resumes there
    resumed = train_network((images, labels), validation, config, checkpoint, record, boxes=boxes)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3] and {s for _e, s in seen} == {64}
    single = train_network((images, labels), validation, replace(config, crop_epochs=None), boxes=boxes)
    assert [h["epoch"] for h in single.history] == [1]
    # --val-every 3: the crop phase validates its 3rd and its last epoch, the whole-image phase every epoch
    sparse = replace(config, epochs=6, crop_epochs=4, validate_every=3, patience=5)
    spaced = train_network((images, labels), validation, sparse, boxes=boxes)
    assert [h["epoch"] for h in spaced.history] == [1, 2, 3, 4, 5, 6]
    assert [h["epoch"] for h in spaced.history if "val_auroc" in h] == [3, 4, 5, 6]


def test_a_context_crop_phase_sits_between_the_crops_and_the_whole_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrainConfig(arch="tiny-resnet-map16", input_size=64, batch_size=8, epochs=5, crop=32, crop_epochs=2,
                         context_crop=48, context_epochs=2, learning_rate=9e-3, patience=1)  # fmt: skip
    # each phase peaks at a third of the one before; phases past --epochs are cut
    assert phases(config) == [Phase(1, 2, 32, 9e-3), Phase(3, 4, 48, 9e-3 / 3), Phase(5, 5, None, 9e-3 / 9)]
    assert phases(replace(config, epochs=3)) == [Phase(1, 2, 32, 9e-3), Phase(3, 3, 48, 9e-3 / 3)]
    assert phases(replace(config, context_epochs=0))[1] == Phase(3, 5, None, 9e-3 / 3)

    images, labels = torch.rand(16, 1, 64, 64), torch.tensor([0.0, 1.0] * 8)
    boxes = torch.tensor([[float("nan")] * 4, [10.0, 10.0, 20.0, 20.0]] * 8)
    seen: set[tuple[int, int]] = set()  # (epoch, side of the images a training batch held)
    sizes = spy_batch_sides(monkeypatch)
    trained = train_network(
        (images, labels), (images, labels), config, progress=lambda e, _b: seen.add((e, sizes[-1])), boxes=boxes
    )
    assert [h["epoch"] for h in trained.history] == [1, 2, 3, 4, 5]
    assert seen == {(1, 32), (2, 32), (3, 48), (4, 48), (5, 64)}
    for wrong in (replace(config, context_crop=80), replace(config, crop_epochs=None)):
        with pytest.raises(ValueError, match="context-crop"):
            train_network((images, labels), (images, labels), wrong, boxes=boxes)

    def refused(*extra: str) -> str:
        args = ["train", "--phantom", "--out", str(tmp_path / "no"), "--crop", "32", "--input-size", "64", *extra]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code != 0
        return result.output

    assert "go together" in refused("--crop-epochs", "2", "--context-crop", "48")
    assert "go together" in refused("--context-crop", "48", "--context-epochs", "2")
    assert "larger than --crop" in refused("--crop-epochs", "2", "--context-crop", "32", "--context-epochs", "2")


def test_ema_keeps_the_moving_average_of_the_steps_and_resumes_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrainConfig(arch="tiny-resnet-map16", input_size=64, batch_size=8, epochs=2, learning_rate=3e-3,
                         patience=5, ema_decay=0.8)  # fmt: skip
    generator = torch.Generator().manual_seed(3)
    images, labels = torch.rand(16, 1, 64, 64, generator=generator), torch.tensor([0.0, 1.0] * 8)
    images[1::2, :, 20:30, 20:30] += 1.0  # something to learn: validation AUROC is defined and can change
    steps: list[dict[str, torch.Tensor]] = []  # the weights every update saw, in order
    real_update = training.AveragedModel.update_parameters

    def update_spy(self: training.AveragedModel, model: torch.nn.Module) -> None:
        steps.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})  # the kept network is on cpu
        real_update(self, model)

    monkeypatch.setattr(training.AveragedModel, "update_parameters", update_spy)
    checkpoint = tmp_path / "ck.pt"
    trained = train_network((images, labels), (images, labels), config, checkpoint)
    assert len(steps) == 4  # one update after each of 2 × 2 steps
    assert all({"val_auroc", "val_auroc_raw"} <= set(h) for h in trained.history)
    # the kept weights are the average the run validated at its best epoch: the first update copies, each next
    # one moves it 1 - 0.8 of the way to the steps' weights (one phase: one average across its epochs)
    best = trained.best_epoch
    assert best in (1, 2)
    expected = {k: v.float() for k, v in steps[0].items()}
    for later in steps[1 : 2 * best]:
        expected = {k: 0.8 * v + 0.2 * later[k].float() for k, v in expected.items()}
    kept = trained.network.state_dict()
    for name in ("conv1.weight", "head.weight", "layer1.0.bn1.running_mean"):
        assert torch.allclose(kept[name].float(), expected[name], atol=1e-6), name
    saved = torch.load(checkpoint, weights_only=False)
    assert not torch.equal(saved["ema"]["module.head.weight"], saved["network"]["head.weight"])

    # interrupted in epoch 2, a run resumes with the average it had, and ends where the whole run ended
    unbroken = trained.network.state_dict()
    checkpoint.unlink()
    interrupt = True

    def stop(epoch: int, _batch: int) -> None:
        if epoch == 2 and interrupt:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_network((images, labels), (images, labels), config, checkpoint, stop)
    interrupt = False
    resumed = train_network((images, labels), (images, labels), config, checkpoint, stop)
    assert resumed.best_epoch == best
    for name, value in resumed.network.state_dict().items():
        assert torch.allclose(value.float(), unbroken[name].float(), atol=1e-6), name
    with pytest.raises(ValueError, match="made with --ema"):
        train_network((images, labels), (images, labels), replace(config, ema_decay=None), checkpoint)
    with pytest.raises(ValueError, match="--ema must lie between 0 and 1"):
        train_network((images, labels), (images, labels), replace(config, ema_decay=1.0))

    # with a crop phase first, the whole-image phase averages afresh from the weights it starts with
    steps.clear()
    boxes = torch.tensor([[float("nan")] * 4, [18.0, 18.0, 32.0, 32.0]] * 8)
    phased = replace(config, arch="tiny-resnet-map16", crop=32, crop_epochs=1)
    train_network((images, labels), (images, labels), phased, tmp_path / "phased.pt", boxes=boxes)
    assert len(steps) == 4
    average = torch.load(tmp_path / "phased.pt", map_location="cpu", weights_only=False)["ema"]
    restarted = 0.8 * steps[2]["head.weight"] + 0.2 * steps[3]["head.weight"]  # phase 2's two steps only
    assert torch.allclose(average["module.head.weight"], restarted, atol=1e-6)
    assert int(average["n_averaged"]) == 2

    refused = CliRunner().invoke(cli, ["train", "--phantom", "--out", str(tmp_path / "no"), *FAST, "--ema", "1.5"])
    assert refused.exit_code != 0 and "--ema must lie between 0 and 1 (got 1.5)" in refused.output
    assert not (tmp_path / "no").exists()


def test_twins_train_side_by_side_under_one_augmentation(tmp_path: Path) -> None:
    # a synth manifest names each normal's fractured twin (twin_of); both share one pair key
    folder = tmp_path / "twins"
    fields = ["image", "label", "split", "pose", "index", "twin_of"]
    rows = [[1, 0, 0, ""], [1, 0, 1, ""], [0, 0, 2, 0], [0, 0, 3, 1], [1, 1, 0, ""], [0, 1, 1, 0], [0, 1, 2, ""]]
    (folder / "images").mkdir(parents=True)
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for number, (label, pose, index, twin_of) in enumerate(rows):
            png(folder / "images" / f"{number}.png", bool(label), number)
            writer.writerow([f"images/{number}.png", label, "train", pose, index, twin_of])
    partners = twin_partners(read_dataset(folder))
    assert partners is not None and partners.tolist() == [2, 3, 0, 1, 5, 4, -1]
    assert twin_partners([Item(path=Path("a.png"), label=1)]) is None

    # evaluation compares each fractured image with its own twin (pairs 0-2 and 1-3 here; 4-5 a tie)
    items = read_dataset(folder)
    scores = np.array([0.9, 0.2, 0.4, 0.6, 0.5, 0.5, 0.1])
    assert twin_comparison(items, scores) == {"pairs": 3, "fractured_above_twin": 1 / 3, "ties": 1 / 3}
    assert twin_comparison([Item(path=Path("a.png"), label=1)], scores[:1]) is None
    # the network-input pixel size of a synth image: its spacing × its longest side / the input size
    sized = replace(items[0], meta={**items[0].meta, "pixel_spacing_mm": "0.5"})
    side = max(Image.open(sized.path).size)
    band = lambda item, size, tiles=None: input_spacing_band(  # noqa: E731
        item, PreprocessConfig(input_size=size, tile_spacing_mm=tiles)
    )
    assert band(sized, side) == "0.4-0.8 mm" and band(sized, side // 2) == "≥ 0.8 mm"
    assert band(sized, side * 4) == SPACING_BANDS[0][0] and band(items[0], side) == ""
    known = replace(sized, path=Path("not-read.png"), size=(2 * side, 10))  # a boxed item's size is known already
    assert band(known, side) == "≥ 0.8 mm"
    # tiled, an input pixel covers the tile spacing: the whole image's 1 mm becomes tiles' 0.6 mm
    assert band(sized, side // 2, 0.6) == "0.4-0.8 mm" and band(sized, side, 0.6) == "0.4-0.8 mm"

    # each epoch's order keeps a pair's images next to each other
    for seed in range(4):
        order = _epoch_order(7, partners, torch.Generator().manual_seed(seed)).tolist()
        assert sorted(order) == list(range(7))
        for i in (0, 1, 4):
            assert abs(order.index(i) - order.index(int(partners[i]))) == 1

    # twins get the same rotation/zoom/mirror: identical images stay identical up to the (per-pixel) noise
    images = torch.rand(1, 1, 64, 64).repeat(4, 1, 1, 1)
    pairs = torch.tensor([1, 0, -1, -1])
    spread_twins, spread_singles = [], []
    for seed in range(8):
        out, _masks = _batch(images, torch.arange(4), None, Augmentation(seed), pairs)
        spread_twins.append(float((out[0] - out[1]).abs().mean()))
        spread_singles.append(float((out[2] - out[3]).abs().mean()))
    assert max(spread_twins) < 0.1 and max(spread_singles) > 0.1

    # --crop: a fractured image's crop holds its box, its twin's is often the very same place, others anywhere
    scene = torch.rand(1, 1, 128, 128)
    fractured = scene.clone()
    fractured[0, 0, 90:100, 20:30] = 2.0  # the "break"
    batch = torch.cat([fractured, scene, torch.rand(1, 1, 128, 128)])
    boxes = torch.tensor([[20.0, 90.0, 30.0, 100.0], [float("nan")] * 4, [float("nan")] * 4])
    pairs = torch.tensor([1, 0, -1])
    same_place = 0
    for seed in range(10):
        crop = (48, torch.Generator().manual_seed(seed))
        out, masks = _batch(batch, torch.arange(3), boxes, None, pairs, crop)
        assert out.shape == (3, 1, 48, 48) and masks is not None and masks.shape == (3, 1, 48, 48)
        assert bool((out[0] == 2.0).any()) and float(masks[0].sum()) > 0 and float(masks[1:].sum()) == 0
        same_place += bool(torch.equal(torch.where(out[0] == 2.0, out[1], out[0]), out[1]))
    assert 0 < same_place < 10  # the twin is cropped where its break is, some of the time


class Brightness(torch.nn.Module):
    """A stand-in logit-map network: ten times each 8 × 8 cell's mean brightness."""

    def logit_map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 8) * 10.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.logit_map(x), dim=(2, 3))


def test_breaks_seen_counts_breaks_the_map_raises_over_their_twin(tmp_path: Path) -> None:
    images = (torch.rand(1, 1, 64, 64) * 0.1).repeat(4, 1, 1, 1)
    images[0, 0, 16:24, 40:48] += 1.0  # pair a: the break shows in its box; pair b: fractured == twin
    ap, pa = {"view": "AP"}, {"view": "PA"}
    items = [
        Item(path=tmp_path / "fa.png", label=1, pair="a", box=(40.0, 16.0, 48.0, 24.0), size=(64, 64), meta=ap),
        Item(path=tmp_path / "fb.png", label=1, pair="b", box=(8.0, 8.0, 16.0, 16.0), size=(64, 64), meta=pa),
        Item(path=tmp_path / "ta.png", label=0, pair="a", meta=ap),
        Item(path=tmp_path / "tb.png", label=0, pair="b", meta=pa),
    ]
    cpu = torch.device("cpu")
    rises = break_rises(Brightness(), images, items, cpu)
    assert rises is not None and set(rises) == {0, 1} and rises[0] > 1.0 and rises[1] == 0.0
    assert breaks_seen(rises) == {"pairs": 2, "breaks_seen": 0.5, "margin_logits": 1.0}
    images[1, 0, 48:56, 48:56] += 1.0  # a change outside pair b's box: still not its break
    moved = break_rises(Brightness(), images, items, cpu)
    assert moved is not None and breaks_seen(moved)["breaks_seen"] == 0.5
    probabilities = Brightness()(images).reshape(-1).numpy()
    assert twin_comparison(items, probabilities) == {
        "pairs": 2, "fractured_above_twin": 1.0, "ties": 0.0}  # fmt: skip  # the image maximum counts anything
    assert break_rises(torch.nn.Identity(), images, items, cpu) is None  # no map
    assert break_rises(Brightness(), images, [replace(i, box=None) for i in items], cpu) is None  # no boxes

    # evaluate's per-image table: one row per image, paths relative to the data set, the rise on fractured rows
    written = write_scores(tmp_path / "scores.csv", items, probabilities, tmp_path, moved)
    with written.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == ["fa.png", "fb.png", "ta.png", "tb.png"]
    assert [r["label"] for r in rows] == ["1", "1", "0", "0"] and [r["view"] for r in rows] == ["AP", "PA", "AP", "PA"]
    assert [float(r["probability"]) for r in rows] == pytest.approx(probabilities.tolist(), abs=1e-6)
    assert float(rows[0]["break_rise_logits"]) == pytest.approx(moved[0], abs=1e-4)
    assert rows[2]["break_rise_logits"] == ""  # a twin has no break


def test_an_ensemble_of_logit_map_bundles_is_a_bundle_that_averages_their_maps(phantoms: Path, tmp_path: Path) -> None:
    bundles = []
    for seed, arch in ((1, "tiny-resnet-map16"), (2, "tiny-resnet-map16"), (3, "tiny-resnet")):
        out = tmp_path / f"m{seed}"
        args = ["train", str(phantoms), "--out", str(out), *FAST, "--arch", arch, "--seed", str(seed)]
        assert CliRunner().invoke(cli, args).exit_code == 0
        bundles.append(out)
    joined = tmp_path / "ensemble"
    made = CliRunner().invoke(cli, ["ensemble", str(bundles[0]), str(bundles[1]), "--out", str(joined),
                                    "--version", "2.0.0", "--name", "joint"])  # fmt: skip
    assert made.exit_code == 0, made.output
    ensemble, first, second = (load_bundle(p) for p in (joined, bundles[0], bundles[1]))
    card = ensemble.card
    assert card.version == "2.0.0" and card.name == "joint" and card.device_uid != first.card.device_uid
    assert card.training["command"] == (f"fracwatch ensemble {bundles[0]} {bundles[1]} --out {joined} "
                                        "--version 2.0.0 --name joint")  # fmt: skip
    assert [m["device_uid"] for m in card.training["members"]] == [first.card.device_uid, second.card.device_uid]
    assert card.operating_points == first.card.operating_points and "--set-operating-points" in made.output
    inputs = torch.rand(3, 1, 64, 64)
    with torch.inference_mode():
        by_hand = torch.amax((first.network.logit_map(inputs) + second.network.logit_map(inputs)) / 2, dim=(2, 3))
        assert torch.allclose(ensemble.network(inputs), by_hand, atol=1e-5)
        assert not torch.allclose(ensemble.network(inputs), first.network(inputs), atol=1e-3)
    maps = grad_cam(ensemble.network, inputs)
    assert maps.shape == (3, 64, 64) and float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0 + 1e-6

    files = [str(phantoms / r["image"]) for r in list(csv.DictReader((phantoms / "manifest.csv").open()))[:2]]
    predicted = CliRunner().invoke(cli, ["predict", "--model", str(joined), "--json", "--cam", str(tmp_path / "cam"),
                                         *files])  # fmt: skip
    assert predicted.exit_code == 0, predicted.output
    assert all(a["model_version"] == "2.0.0" and Path(a["cam"]).is_file() for a in json.loads(predicted.output))
    chosen = CliRunner().invoke(cli, ["evaluate", str(phantoms), "--model", str(joined), "--out", str(tmp_path / "v"),
                                      "--split", "val", "--set-operating-points", "--bootstrap", "100"])  # fmt: skip
    assert chosen.exit_code == 0, chosen.output
    assert load_bundle(joined).card.metrics["operating_points_chosen_on"] == "val"

    resized = tmp_path / "resized"  # the same weights told to read a 96-px input: not the same input
    shutil.copytree(bundles[1], resized)
    resized_card = json.loads((resized / "model.json").read_text())
    resized_card["preprocessing"]["input_size"] = 96
    (resized / "model.json").write_text(json.dumps(resized_card))
    refusals = {
        "other preprocessing": ([bundles[0], resized], "preprocesses otherwise"),
        "a plain network": ([bundles[0], bundles[2]], "logit-map"),
        "one bundle": ([bundles[0]], "at least two"),
        "an ensemble": ([joined, bundles[1]], "ensemble already"),
    }
    for number, (members, reason) in enumerate(refusals.values()):
        out = tmp_path / f"refused{number}"
        refused = CliRunner().invoke(cli, ["ensemble", *map(str, members), "--out", str(out), "--version", "1"])
        assert refused.exit_code == 1 and reason in refused.output and not out.exists(), (reason, refused.output)
    occupied = CliRunner().invoke(cli, ["ensemble", str(bundles[0]), str(bundles[1]), "--out", str(joined),
                                        "--version", "3"])  # fmt: skip
    assert occupied.exit_code == 1 and "not empty" in occupied.output
    assert load_bundle(joined).card.version == "2.0.0"


@pytest.mark.parametrize(
    ("arch", "outputs"), [("tiny-resnet", 1), ("tiny-resnet", 3), ("tiny-resnet-max", 1), ("tiny-resnet-map", 1)]
)
def test_grad_cam_shape_and_range(arch: str, outputs: int) -> None:
    builder, params = PRESETS[arch]
    network = build_network(builder, {**params, "outputs": outputs}).eval()
    inputs = torch.rand(2, 1, 96, 96)
    maps = grad_cam(network, inputs)
    assert maps.shape == (2, 96, 96) and maps.dtype == np.float32
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0 + 1e-6
    assert all(p.grad is None for p in network.parameters())


def test_grad_cam_is_hottest_where_the_logit_map_is_highest() -> None:
    """For a logit-map network Grad-CAM of the image logit (the map's maximum) is the map above its bias: its hot
    spot must be the strongest cell, not the coolest (MONAI's default normaliser flips maps to (1, 0))."""
    torch.manual_seed(0)
    builder, params = PRESETS["tiny-resnet-map16"]
    network = build_network(builder, {**params, "outputs": 1}).eval()
    inputs = torch.rand(3, 1, 128, 128)
    with torch.no_grad():
        cells = network.logit_map(inputs)[:, 0]  # (3, 8, 8): one cell per 16 × 16 pixels
    maps = grad_cam(network, inputs)
    for image in range(3):
        row, col = divmod(int(cells[image].argmax()), cells.shape[-1])
        hot_row, hot_col = divmod(int(maps[image].argmax()), 128)
        assert abs(hot_row // 16 - row) <= 1 and abs(hot_col // 16 - col) <= 1, (image, (row, col), (hot_row, hot_col))
        assert float(maps[image].max()) == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_crop_training_and_augmentation_run_on_cuda() -> None:
    images, labels = torch.rand(16, 1, 64, 64), torch.tensor([0.0, 1.0] * 8)
    boxes = torch.tensor([[float("nan")] * 4, [10.0, 10.0, 20.0, 20.0]] * 8)
    augmented, masks = Augmentation(0)(images.cuda(), box_masks(boxes, 64).cuda())
    assert augmented.device.type == "cuda" and masks is not None and masks.device.type == "cuda"
    config = TrainConfig(arch="tiny-resnet-map16", input_size=64, batch_size=8, epochs=2, crop=32, crop_epochs=1,
                         device="cuda")  # fmt: skip
    result = train_network((images, labels), (images, labels), config, boxes=boxes)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(bool(torch.isfinite(p).all()) for p in result.network.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_interrupted_cuda_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """float16 autocast with GradScaler (precision auto on CUDA) and a resume: the checkpoint's random generators
    are CPU states whatever the device (a CUDA map_location once moved them and the resume failed), and it carries
    the loss scale."""
    images, labels = torch.rand(24, 1, 64, 64), torch.tensor([0.0, 1.0] * 12)
    config = TrainConfig(input_size=64, batch_size=8, epochs=2, device="cuda")
    resumed = interrupted_in_epoch_2_then_resumed(config, tmp_path / "ck.pt", images, labels)
    assert torch.load(tmp_path / "ck.pt", weights_only=False)["scaler"]["scale"] > 0  # the loss scale goes on
    assert all(bool(torch.isfinite(p).all()) for p in resumed.network.parameters())


def test_a_tiled_image_trains_as_its_fracture_tile_and_its_twin_as_the_same_tile(
    phantoms: Path, tmp_path: Path
) -> None:
    """Whole-chest-like images (320 mm at 1 mm per pixel) under a 0.5 mm tile spacing: training sees the tile
    that holds the break, and the twin's same tile; validation scores every tile; the card keeps the spacing."""
    rng = np.random.default_rng(3)
    base = rng.normal(0.4, 0.05, (256, 320)).clip(0, 1)
    broken = base.copy()
    broken[200:212, 250:262] = 1.0  # the "break": bottom right, far from the first tiles
    folder = tmp_path / "wide"
    (folder / "images").mkdir(parents=True)
    for name, pixels in (("f.png", broken), ("t.png", base)):
        Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / "images" / name)
    fields = ["image", "label", "split", "pose", "index", "twin_of", "x0", "y0", "x1", "y1", "pixel_spacing_mm"]
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        writer.writerow(["images/f.png", 1, "train", 0, 0, "", 250, 200, 262, 212, "1.0"])
        writer.writerow(["images/t.png", 0, "train", 0, 1, 0, "", "", "", "", "1.0"])
    items = read_dataset(folder)
    config = PreprocessConfig(input_size=64, tile_spacing_mm=0.5)
    grids = item_grids(items, config)
    assert grids[0] is not None and grids[0] == grids[1] and len(grids[0].origins) > 1
    chosen = chosen_tiles(items, grids, 64)
    tiles, boxes = chosen.tiles, chosen.boxes
    assert tiles[0] is not None and tiles[0] > 0 and tiles[1] == tiles[0]
    assert bool((boxes[0] >= 0).all() and (boxes[0] <= 64).all()) and bool(torch.isnan(boxes[1]).all())
    x0, y0, x1, y1 = (int(v) for v in boxes[0])
    training = load_tensors(items, config)
    assert training.shape == (2, 1, 64, 64)
    assert float(training[0, 0, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].mean()) > 0.95  # the break is in its tile
    assert float(training[1, 0, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].mean()) < 0.9  # the twin's same tile has none
    everything = load_inputs(items, config)
    assert len(everything.images) == 2 * len(grids[0].origins) and everything.owners.tolist()[0] == 0
    assert everything.grids == grids and not everything.one_per_item  # the headers' grids are the loader's
    # an image scores as its strongest input, the first among equals
    values = np.array([0.2, 0.9, 0.9, 0.1, 0.4])
    assert [a.tolist() for a in strongest_inputs(values, torch.tensor([0, 0, 0, 1, 1]))] == [[0.9, 0.4], [1, 4]]
    # training's validation and evaluate: the strongest, its odds divided by the item's tile count when asked
    owners = torch.tensor([0, 0, 0, 1, 1])
    assert [a.tolist() for a in image_probabilities(values, owners, False)] == [[0.9, 0.4], [1, 4]]
    corrected, first = image_probabilities(values, owners, True)
    assert np.allclose(corrected, [0.9 / (0.9 + 3 * 0.1), 0.4 / (0.4 + 2 * 0.6)]) and first.tolist() == [1, 4]
    assert np.array_equal(image_probabilities(values, None, True)[0], values)  # one input per item: nothing to correct

    model = tmp_path / "model"
    trained = CliRunner().invoke(cli, ["train", str(phantoms), "--out", str(model), *FAST, "--arch",
                                       "tiny-resnet-map", "--tile-spacing-mm", "0.5",
                                       "--tile-count-correction"])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    card = load_bundle(model).card
    assert card.preprocessing.tile_spacing_mm == 0.5 and "--tile-spacing-mm 0.5" in card.training["command"]
    assert card.preprocessing.tile_count_correction and "--tile-count-correction" in card.training["command"]
    assert 0.0 <= card.metrics["validation_auroc"] <= 1.0


def test_bf16_training_steps_compute_in_bfloat16_and_validation_in_float32(phantoms: Path, tmp_path: Path) -> None:
    """--precision bf16: every training step's convolutions run in bfloat16 (on a CPU too), the weights and the
    loss stay float32, validation scores in float32; the card records the precision."""
    assert autocast_dtype(torch.device("cpu")) == torch.float32  # inference, and training by default
    assert autocast_dtype(torch.device("cuda")) == torch.float16
    assert autocast_dtype(torch.device("cuda"), "fp32") == torch.float32
    assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision 'fp8'"):
        autocast_dtype(torch.device("cpu"), "fp8")
    option = next(o for o in cli.commands["train"].params if o.name == "precision")
    assert tuple(option.type.choices) == PRECISIONS  # type: ignore[attr-defined]

    images, labels = torch.rand(16, 1, 64, 64), torch.tensor([0.0, 1.0] * 8)
    boxes = torch.tensor([[float("nan")] * 4, [10.0, 10.0, 20.0, 20.0]] * 8)
    config = TrainConfig(arch="tiny-resnet-map16", input_size=64, batch_size=8, epochs=2, crop=32, crop_epochs=1,
                         precision="bf16")  # fmt: skip
    seen: list[tuple[bool, torch.dtype]] = []  # (training mode, dtype of the first convolution's output)
    real_build = training.build_network

    def spied_build(*args: object, **kwargs: object) -> torch.nn.Module:
        network = real_build(*args, **kwargs)  # type: ignore[arg-type]
        first = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
        first.register_forward_hook(lambda module, _in, out: seen.append((module.training, out.dtype)))
        return network

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "build_network", spied_build)
        result = train_network((images, labels), (images, labels), config, boxes=boxes)
    assert {dtype for mode, dtype in seen if mode} == {torch.bfloat16}
    # validation scores as inference does on the device it trains on (float32 on a CPU, float16 autocast on CUDA),
    # the final validation of the kept weights on the CPU in float32
    validated = {autocast_dtype(select_device(config.device)), torch.float32}
    assert {dtype for mode, dtype in seen if not mode} == validated
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in result.network.parameters())
    assert all(np.isfinite(h["loss"]) for h in result.history) and [h["epoch"] for h in result.history] == [1, 2]

    model = tmp_path / "model"
    trained = CliRunner().invoke(cli, ["train", str(phantoms), "--out", str(model), *FAST, "--precision", "bf16"])
    assert trained.exit_code == 0, trained.output
    card = load_bundle(model).card
    assert card.training["config"]["precision"] == "bf16" and "--precision bf16" in card.training["command"]
    # the hardware it ran on, for the card's epoch times (metrics.history) to be read against
    expected = f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu: "
    assert card.training["device"].startswith(expected), card.training["device"]
    if not torch.cuda.is_available():
        threads, capability = torch.get_num_threads(), torch.backends.cpu.get_cpu_capability()
        assert f"{threads} threads, {capability}" in card.training["device"]


def test_the_card_names_amx_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """training.device says AMX after the vector width where torch's probe finds AMX tiles, nothing where it finds
    none, and nothing where this torch has no probe — whatever this machine has."""
    cpu = torch.device("cpu")
    width = f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert has_amx() and describe_device(cpu).startswith(f"cpu: {width}, AMX, ")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not has_amx() and describe_device(cpu).startswith(f"cpu: {width}, ") and "AMX" not in describe_device(cpu)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert not has_amx() and "AMX" not in describe_device(cpu)


def test_bf16_training_warns_where_bfloat16_is_emulated(caplog: pytest.LogCaptureFixture) -> None:
    """Without native bfloat16 (no AVX512-BF16 or AMX) --precision bf16 is several times slower than fp32: the run
    says so at its start, and trains all the same; where it is native, nothing is said."""
    cpu = torch.device("cpu")
    assert describe_device(cpu).endswith(", native bfloat16" if native_bfloat16(cpu) else ", no native bfloat16")
    images, labels = torch.rand(8, 1, 32, 32), torch.tensor([0.0, 1.0] * 4)
    for native in (False, True):
        caplog.clear()
        with pytest.MonkeyPatch.context() as patch, caplog.at_level("WARNING", logger="fracwatch.model.training"):
            patch.setattr(training, "native_bfloat16", lambda _device, native=native: native)
            config = TrainConfig(input_size=32, batch_size=8, epochs=1, precision="bf16", device="cpu")
            result = train_network((images, labels), (images, labels), config)
        warned = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
        assert warned == ([] if native else ["--precision bf16 on cpu without native bfloat16 (no AVX512-BF16 or "
                                             "AMX): emulated, several times slower than --precision fp32"])  # fmt: skip
        assert [h["epoch"] for h in result.history] == [1]


def test_freeze_stem_keeps_the_stem_and_first_stage_through_the_whole_image_phase() -> None:
    """--freeze-stem: the crop phase trains every layer; in the whole-image phase the stem and first stage keep the
    crop-trained weights (their BatchNorm statistics still follow the whole images) while the deeper stages learn."""
    images, labels = torch.rand(16, 1, 64, 64), torch.tensor([0.0, 1.0] * 8)
    images[1::2, :, 20:30, 20:30] += 1.0
    boxes = torch.tensor([[float("nan")] * 4, [20.0, 20.0, 30.0, 30.0]] * 8)
    config = TrainConfig(arch="tiny-resnet-map16", input_size=64, batch_size=8, epochs=2, crop=32, crop_epochs=1,
                         learning_rate=3e-3, device="cpu", freeze_stem=True)  # fmt: skip
    built: list[torch.nn.Module] = []
    real_build = training.build_network

    def spied_build(*args: object, **kwargs: object) -> torch.nn.Module:
        built.append(real_build(*args, **kwargs))  # type: ignore[arg-type]
        return built[-1]

    states: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(epoch: int, batch: int) -> None:  # after each epoch's last batch (two batches an epoch)
        if batch == 2:
            states[epoch] = {k: v.detach().clone() for k, v in built[0].state_dict().items()}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "build_network", spied_build)
        train_network((images, labels), (images, labels), config, progress=snapshot, boxes=boxes)
    torch.manual_seed(config.seed)  # the network train_network built first thing after seeding, as it started
    builder, params = PRESETS[config.arch]
    start = build_network(builder, {**params, "outputs": 1}).state_dict()
    crop, whole = states[1], states[2]
    frozen = [k for k, p in built[0].named_parameters() if k.split(".")[0] in training.FROZEN_IN_WHOLE]
    assert "conv1.weight" in frozen and any(k.startswith("layer1.") for k in frozen)
    assert not torch.equal(start["conv1.weight"], crop["conv1.weight"])  # the crop phase trained the stem
    assert all(torch.equal(crop[k], whole[k]) for k in frozen)  # fixed through the whole-image epoch
    assert not torch.equal(crop["layer2.0.conv1.weight"], whole["layer2.0.conv1.weight"])  # deeper stages learn
    assert not torch.equal(crop["layer1.0.bn1.running_mean"], whole["layer1.0.bn1.running_mean"])  # stats follow

    for no_whole_phase in (
        replace(config, crop=None, crop_epochs=None),  # one phase, no crops
        replace(config, crop_epochs=2),  # crops to the end
        replace(config, epochs=3, context_crop=48, context_epochs=2),  # context crops to the end
    ):
        assert "applies to a whole-image phase" in (config_problem(no_whole_phase) or "")
    assert config_problem(replace(config, epochs=4, context_crop=48, context_epochs=2)) is None
    assert "needs a ResNet preset" in (config_problem(replace(config, arch="densenet121")) or "")


def test_grad_cam_peaks_are_checked_against_the_breaks_boxes(phantoms: Path, tmp_path: Path) -> None:
    """Grad-CAM sanity: evaluate reports how often the heat map of a fractured test image peaks inside its
    break's box, beside the chance of a random peak (the shipped DRR bundle: 84 % of 288, chance 3 %, in its
    card). The phantom bundle is a pooled ResNet, not a logit map: its heat maps localise less, above chance."""
    from fracwatch.lab.evaluate import box_share, peak_in_box
    from tests.conftest import PHANTOM_MODEL

    heat = np.zeros((64, 64), dtype=np.float32)
    heat[40, 10] = 1.0  # row 40, column 10
    assert peak_in_box(heat, (8.0, 38.0, 12.0, 42.0)) and peak_in_box(heat, (12.0, 42.0, 20.0, 50.0))  # margin 4
    assert not peak_in_box(heat, (20.0, 20.0, 30.0, 30.0))
    assert box_share((4.0, 4.0, 60.0, 60.0), 64) == 1.0 and 0 < box_share((30.0, 30.0, 34.0, 34.0), 64) < 0.1

    out = tmp_path / "eval"
    result = CliRunner().invoke(cli, ["evaluate", str(phantoms), "--model", str(PHANTOM_MODEL), "--out", str(out),
                                      "--bootstrap", "100"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rows = [r for r in csv.DictReader((phantoms / "manifest.csv").open()) if r["split"] == "test"]
    boxed = [r for r in rows if r["label"] == "1" and r["x0"]]
    cam = report["grad_cam"]
    assert cam["images"] == len(boxed) > 0 and cam["margin_px"] == 4
    assert 0 < cam["chance"] < 0.5 and cam["peak_in_box"] > cam["chance"]
