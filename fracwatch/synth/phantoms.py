"""The 2-D procedural phantom mode of ``fracwatch synth`` (fast; what unit tests train on)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from fracwatch.synth.dicomio import write_dx
from fracwatch.synth.phantom import render_phantom, to_stored
from fracwatch.synth.render import MANIFEST_FIELDS, SynthConfig, split_of


def render_phantoms(out: Path, config: SynthConfig) -> Path:
    """``poses × per_pose`` phantoms (the fractured fraction as asked) with the DRR manifest's columns."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    fractured_count = round(config.per_pose * config.fractured_fraction)
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        for pose in range(config.poses):
            for index in range(config.per_pose):
                fractured = index < fractured_count
                phantom = render_phantom(config.seed * 1_000_003 + pose * 1000 + index, fractured)
                stored = to_stored(phantom.image)
                name = f"p{pose:04d}_i{index:02d}"
                Image.fromarray(stored).save(out / "images" / f"{name}.png")
                record: dict[str, object] = {field: "" for field in MANIFEST_FIELDS}
                record.update(
                    image=f"images/{name}.png",
                    label=int(fractured),
                    bone_class="phantom" if fractured else "none",
                    view="AP",
                    fov="detail",
                    pixel_spacing_mm=0.2,
                    photometric="MONOCHROME2",
                    split=split_of(pose, config),
                    pose=pose,
                    index=index,
                )
                if phantom.bbox is not None:
                    record.update(zip(("x0", "y0", "x1", "y1"), phantom.bbox, strict=True))
                if config.dicom:
                    record.update(write_dx(out / "dicom", name, np.asarray(stored), "MONOCHROME2", record, config.seed))
                writer.writerow(record)
    return manifest
