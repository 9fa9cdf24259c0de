"""``fracwatch synth``: synthetic radiographs with simulated fractures (DRRs, or 2-D phantoms)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fracwatch.cli.common import (
    configure_logging,
    fail,
)
from fracwatch.errors import FracwatchError


@click.command()
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Output folder.")
@click.option("--ct", "ct_path", type=click.Path(path_type=Path, dir_okay=False), help="CT volume (NIfTI).")
@click.option("--labels", type=click.Path(path_type=Path, dir_okay=False), help="TotalSegmentator-style labels.")
@click.option("--structures", type=click.Path(path_type=Path, dir_okay=False), help="CSV: id,structure names.")
@click.option("--poses", type=click.IntRange(1, 100000), default=100, show_default=True)
@click.option("--per-pose", type=click.IntRange(1, 1000), default=16, show_default=True, help="Images per pose.")
@click.option("--fractured", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Fraction fractured.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=(int, int), default=(384, 640), show_default=True, help="Output long side range, px.")
@click.option("--no-dicom", is_flag=True, help="PNG + manifest only (no DICOM DX studies).")
@click.option("--phantom", is_flag=True, help="2-D procedural limb phantoms instead of DRRs (fast; for tests).")
@click.option(
    "--randomise",
    is_flag=True,
    help="Domain randomisation of each image's look: beam, scatter, noise, window and LUT shape, collimation, "
    "side markers and text (twins keep the same look).",
)
@click.option(
    "--family",
    type=click.Choice(["a", "b"]),
    default="a",
    show_default=True,
    help="a: the training generator; b: a second, independently written one for evaluation only (its own "
    "fracture model, projection and processing; every image in the split external; train refuses it). "
    "With b, --poses x --per-pose images are rendered.",
)
@click.option(
    "--twins/--no-twins",
    default=True,
    show_default=True,
    help="Each normal image is a fractured image's twin (same view, exposure, noise; no break).",
)
@click.option("--first-pose", type=click.IntRange(min=0), default=0, show_default=True,
              help="Index of the first pose (a pose's images depend on the seed and its index only).")
@click.option("--splits", "splits", type=click.Choice(["train", "val", "test"]), multiple=True,
              help="Render only the poses that fall in these splits (repeatable; default: all).")
@click.option("--append", is_flag=True,
              help="Add the poses to the set already in --out (same seed and image settings; new poses only).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Render poses in this many processes (one thread each); the output is the same.")
def synth(
    out: Path,
    ct_path: Path | None,
    labels: Path | None,
    structures: Path | None,
    poses: int,
    per_pose: int,
    fractured: float,
    seed: int,
    size: tuple[int, int],
    no_dicom: bool,
    phantom: bool,
    randomise: bool,
    family: str,
    twins: bool,
    first_pose: int,
    splits: tuple[str, ...],
    append: bool,
    workers: int,
) -> None:
    """Render synthetic radiographs (DRRs from a CT with simulated fractures): PNG, manifest.csv, DICOM DX.

    More training data beside a fixed validation and test split: render the set once, then add poses with
    ``--append --first-pose N --splits train`` (same seed and sizes)."""
    from fracwatch.synth.ct import load_ct
    from fracwatch.synth.phantoms import render_phantoms
    from fracwatch.synth.render import SynthConfig, render_dataset, rendered_poses

    configure_logging("WARNING")
    config = SynthConfig(
        poses=poses,
        per_pose=per_pose,
        fractured_fraction=fractured,
        seed=seed,
        min_size=min(size),
        max_size=max(size),
        dicom=not no_dicom,
        twins=twins,
        first_pose=first_pose,
        splits=splits or ("train", "val", "test"),
        randomise=randomise,
    )
    if phantom and (first_pose or splits or append or randomise):
        raise click.UsageError("--first-pose, --splits, --append and --randomise apply to DRRs, not --phantom")
    if family == "b":
        if phantom or append or first_pose or splits:
            raise click.UsageError("--family b renders a test set of its own: no --phantom, --append or splits")
        _family_b(out, ct_path, labels, structures, poses * per_pose, seed)
        return
    count = poses if phantom else len(rendered_poses(config))
    try:
        if phantom:
            manifest = render_phantoms(out, config)
        else:
            volume = load_ct(ct_path, labels, structures)
            with click.progressbar(length=count, label="rendering poses", file=sys.stderr) as bar:
                manifest = render_dataset(
                    volume, out, config, progress=lambda n: bar.update(1), append=append, workers=workers
                )
    except FracwatchError as exc:
        fail(exc)
    click.echo(f"wrote {count * per_pose} images ({'appended to' if append else 'manifest'} {manifest})")


def _family_b(
    out: Path, ct_path: Path | None, labels: Path | None, structures: Path | None, images: int, seed: int
) -> None:
    from fracwatch.synth import family_b
    from fracwatch.synth.ct import load_ct

    try:
        manifest = family_b.render(load_ct(ct_path, labels, structures), out, images, seed)
    except FracwatchError as exc:
        fail(exc)
    click.echo(f"wrote family b (evaluation only) images; manifest {manifest}")
