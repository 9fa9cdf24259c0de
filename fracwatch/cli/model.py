"""``fracwatch train``, ``evaluate``, ``ensemble``, ``export-runtime`` and ``predict``: the model lifecycle."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fracwatch.cli.common import (
    EXIT_ERROR,
    LOAD_WORKERS,
    configure_logging,
    fail,
    load,
    progress_printer,
)
from fracwatch.errors import FracwatchError

LAYOUT = click.option(
    "--layout", type=click.Choice(["auto", "manifest", "folder", "csv", "dicom"]), default="auto", show_default=True
)


def bundle_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--model BUNDLE`` (required), passed as ``bundle``."""
    return click.option(
        "--model", "bundle", type=click.Path(path_type=Path, file_okay=False), required=True, help=help_text
    )


@click.command()
@click.argument("dataset", required=False, type=click.Path(path_type=Path))
@click.option("--phantom", is_flag=True, help="Train on 2-D procedural phantoms (the bootstrap data set).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Bundle directory.")
@LAYOUT
@click.option("--labels", "labels_csv", type=click.Path(path_type=Path, dir_okay=False), help="Labels of DICOM files.")
@click.option(
    "--task",
    type=click.Choice(["binary", "bone"]),
    default="binary",
    show_default=True,
    help="binary: fracture or not; bone: no fracture / one class per fractured bone (synth bone_class).",
)
@click.option("--arch", default="tiny-resnet", show_default=True, help="Network preset.")
@click.option("--epochs", type=click.IntRange(1, 1000), default=8, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--input-size", type=click.IntRange(32, 2048), default=256, show_default=True)
@click.option("--lr", "learning_rate", type=click.FloatRange(1e-6, 1.0), default=2e-3, show_default=True)
@click.option("--patience", type=click.IntRange(1, 1000), default=6, show_default=True, help="Early stopping.")
@click.option("--folds", type=click.IntRange(1, 20), default=1, show_default=True, help="K-fold cross-validation.")
@click.option("--val-fraction", type=click.FloatRange(0.05, 0.5), default=0.15, show_default=True)
@click.option(
    "--init-weights",
    type=click.Path(path_type=Path, exists=True),
    help="Local state dict, or a model bundle folder (its verified weights), to start from.",
)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@click.option("--no-augment", is_flag=True, help="Train without augmentation.")
@click.option(
    "--crop",
    type=click.IntRange(32, 2048),
    help="Train a logit-map network on crops this size (fracture sites, their twins, anywhere); "
    "validate on whole images.",
)
@click.option(
    "--crop-epochs",
    type=click.IntRange(1, 1000),
    help="With --crop: this many epochs on crops, then the rest on whole images (fine-tuning at a third of --lr).",
)
@click.option(
    "--context-crop",
    type=click.IntRange(32, 2048),
    help="With --crop-epochs: after the crop epochs, --context-epochs on crops this size (larger than --crop: more "
    "anatomy around each break) before the whole images; each phase at a third of the one before's learning rate.",
)
@click.option(
    "--context-epochs",
    type=click.IntRange(1, 1000),
    help="With --context-crop: how many epochs on those crops.",
)
@click.option(
    "--val-every",
    "validate_every",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="With --crop-epochs: validate the crop phase every N epochs (and at its end); whole-image epochs always.",
)
@click.option(
    "--tile-spacing-mm",
    type=click.FloatRange(min=0, min_open=True),
    help="Images of known pixel spacing coarser than this many mm per input pixel (whole chests) are scored as "
    "tiles at it: trained on the tile holding the fracture, validated on all; stored in the bundle.",
)
@click.option(
    "--tile-count-correction",
    is_flag=True,
    help="With --tile-spacing-mm: a tiled image's fracture odds are its strongest tile's divided by its tile count "
    "(validation and the bundle score so).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp32"]),
    default="auto",
    show_default=True,
    help="Training steps' arithmetic: auto = float16 autocast on CUDA, float32 on a CPU; bf16 = bfloat16 autocast "
    "(1.4-1.7x as fast per epoch on an AVX512-BF16 CPU; without native bfloat16 it is emulated, several times "
    "slower, and the run warns); validation and scoring unchanged.",
)
@click.option(
    "--ema",
    "ema_decay",
    type=float,
    help="Keep an exponential moving average of the weights with this decay per step (e.g. 0.999, between 0 and 1): "
    "validation scores the average and the bundle holds it; the steps' own weights are validated beside it.",
)
@click.option(
    "--freeze-stem",
    is_flag=True,
    help="With --crop-epochs: in the whole-image phase keep the stem and first stage as the crops trained them "
    "(a 256-px bfloat16 step 0.51-0.66x the time on AVX512-BF16 and AMX CPUs; at full scale no accuracy gain, see "
    "docs/model-development.md); ResNet presets.",
)
@click.option("--train-count", type=click.IntRange(10, 10_000_000), default=3000, show_default=True)
@click.option("--val-count", type=click.IntRange(10, 10_000_000), default=600, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--version", "model_version", default="0.1.0", show_default=True, help="Model version for the card.")
@LOAD_WORKERS
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def train(
    dataset: Path | None,
    phantom: bool,
    out: Path,
    layout: str,
    labels_csv: Path | None,
    task: str,
    arch: str,
    epochs: int,
    batch_size: int,
    input_size: int,
    learning_rate: float,
    patience: int,
    folds: int,
    val_fraction: float,
    init_weights: Path | None,
    resume: bool,
    no_augment: bool,
    crop: int | None,
    crop_epochs: int | None,
    context_crop: int | None,
    context_epochs: int | None,
    validate_every: int,
    tile_spacing_mm: float | None,
    tile_count_correction: bool,
    precision: str,
    ema_decay: float | None,
    freeze_stem: bool,
    train_count: int,
    val_count: int,
    seed: int,
    model_version: str,
    device: str,
    load_workers: int,
) -> None:
    """Train a model on DATASET (synth folder, class folders, CSV, or DICOM + --labels) or --phantom; write a
    bundle (weights + model card filled from the run)."""
    from fracwatch.lab.train import TrainRequest, train_from_dataset, train_phantom_bundle
    from fracwatch.model.networks import PRESETS
    from fracwatch.model.training import TrainConfig, config_problem

    configure_logging("INFO")
    if phantom == (dataset is not None):
        raise click.UsageError("give a DATASET or --phantom (one of them)")
    if crop_epochs is not None and crop is None:
        raise click.BadParameter("--crop-epochs needs --crop", param_hint="--crop-epochs")
    if tile_count_correction and not tile_spacing_mm:
        raise click.BadParameter("needs --tile-spacing-mm", param_hint="--tile-count-correction")
    if arch not in PRESETS:
        raise click.BadParameter(f"{arch!r}; choose from {', '.join(PRESETS)}", param_hint="--arch")
    config = TrainConfig(
        arch=arch,
        input_size=input_size,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        patience=patience,
        seed=seed,
        device=device,
        init_weights=str(init_weights) if init_weights else None,
        augment=not no_augment,
        crop=crop,
        crop_epochs=crop_epochs,
        context_crop=context_crop,
        context_epochs=context_epochs or 0,
        validate_every=validate_every,
        tile_spacing_mm=tile_spacing_mm,
        tile_count_correction=tile_count_correction,
        precision=precision,
        ema_decay=ema_decay,
        freeze_stem=freeze_stem,
    )
    if problem := config_problem(config):
        raise click.UsageError(problem)
    try:
        if phantom:
            card = train_phantom_bundle(out, config, train_count, val_count, model_version)
        else:
            assert dataset is not None
            command = (
                f"fracwatch train {shlex.quote(str(dataset))} --out {shlex.quote(str(out))} --layout {layout} "
                f"--task {task} --arch {arch} --input-size {input_size} --epochs {epochs} --batch-size {batch_size} "
                f"--lr {learning_rate:g} --patience {patience} --folds {folds} --val-fraction {val_fraction:g} "
                f"--seed {seed} --version {shlex.quote(model_version)}"
                + (f" --labels {shlex.quote(str(labels_csv))}" if labels_csv else "")
                + (f" --init-weights {shlex.quote(str(init_weights))}" if init_weights else "")
                + (" --no-augment" if no_augment else "")
                + (f" --crop {crop}" if crop else "")
                + (f" --crop-epochs {crop_epochs}" if crop_epochs else "")
                + (f" --context-crop {context_crop} --context-epochs {context_epochs}" if context_crop else "")
                + (f" --val-every {validate_every}" if validate_every > 1 else "")
                + (f" --tile-spacing-mm {tile_spacing_mm:g}" if tile_spacing_mm else "")
                + (" --tile-count-correction" if tile_count_correction else "")
                + (f" --precision {precision}" if precision != "auto" else "")
                + (f" --ema {ema_decay:g}" if ema_decay is not None else "")
                + (" --freeze-stem" if freeze_stem else "")
            )
            request = TrainRequest(
                dataset,
                out,
                config,
                layout,
                labels_csv,
                val_fraction,
                folds,
                task,
                model_version,
                resume=resume,
                command=command,
                load_workers=load_workers,
            )
            card = train_from_dataset(request, progress_printer())
    except (FracwatchError, ValueError) as exc:
        fail(exc if isinstance(exc, FracwatchError) else FracwatchError(str(exc)))
    cv = card.training.get("cross_validation")
    click.echo(
        f"bundle {out}: validation AUROC {card.metrics['validation_auroc']:.4f}, "
        f"doubt ≥ {card.operating_points.doubt:.3f}, positive ≥ {card.operating_points.positive:.3f}"
        + (f"; {folds}-fold AUROC {cv['auroc_mean']:.4f} ± {cv['auroc_sd']:.4f}" if cv else "")
    )


@click.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@bundle_option("Model bundle to evaluate.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder for report.json and the plots.",
)
@click.option("--split", help="Only this split (default: test when the data set has one, else everything).")
@LAYOUT
@click.option("--labels", "labels_csv", type=click.Path(path_type=Path, dir_okay=False), help="Labels of DICOM files.")
@click.option(
    "--set-operating-points",
    is_flag=True,
    help="Choose doubt/positive thresholds on these data (use validation data) and write them into the bundle.",
)
@click.option("--doubt-sensitivity", type=click.FloatRange(0.5, 1.0), default=0.95, show_default=True)
@click.option("--positive-specificity", type=click.FloatRange(0.5, 1.0), default=0.95, show_default=True)
@click.option("--record-in-card", is_flag=True, help="Store the evaluation summary in the bundle's model card.")
@click.option("--bootstrap", type=click.IntRange(100, 100000), default=1000, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--tile-spacing-mm",
    type=click.FloatRange(min=0),
    help="Score images of known pixel spacing as tiles no coarser than this many mm per input pixel (0: whole "
    "images), instead of the bundle's setting; with --set-operating-points it is written into the bundle too.",
)
@click.option(
    "--tile-count-correction/--no-tile-count-correction",
    default=None,
    help="Divide a tiled image's strongest-tile fracture odds by its tile count, or not, instead of the bundle's "
    "setting; with --set-operating-points it is written into the bundle too.",
)
@LOAD_WORKERS
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evaluate(
    dataset: Path,
    bundle: Path,
    out: Path,
    split: str | None,
    layout: str,
    labels_csv: Path | None,
    set_operating_points: bool,
    doubt_sensitivity: float,
    positive_specificity: float,
    record_in_card: bool,
    bootstrap: int,
    device: str,
    tile_spacing_mm: float | None,
    tile_count_correction: bool | None,
    load_workers: int,
    as_json: bool,
) -> None:
    """Evaluate a bundle on a labelled DATASET: AUROC with a bootstrap CI, sensitivity/specificity at both
    operating points, accuracy/precision/recall/F1, confusion matrix, ROC/PR/calibration plots, report.json."""
    from fracwatch.lab.evaluate import EvaluateRequest, evaluate_bundle

    configure_logging("WARNING")
    request = EvaluateRequest(
        bundle,
        dataset,
        out,
        split,
        layout,
        labels_csv,
        set_operating_points,
        record_in_card,
        doubt_sensitivity,
        positive_specificity,
        bootstrap,
        device,
        load_workers,
        tile_spacing_mm,
        tile_count_correction,
    )
    try:
        report = evaluate_bundle(request, progress_printer())
    except (FracwatchError, ValueError) as exc:
        fail(exc if isinstance(exc, FracwatchError) else FracwatchError(str(exc)))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return

    def f(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    low, high = report["auroc_ci95"]
    click.echo(f"{report['images']} images ({report['fractured']} fractured), split {report['data']['split']}")
    click.echo(f"AUROC {f(report['auroc'])} (95% CI {f(low)}-{f(high)})")
    for name in ("doubt", "positive"):
        at = report[f"at_{name}"]
        click.echo(
            f"at {name} (p ≥ {f(at['threshold'])}): sensitivity {f(at['sensitivity'])}, specificity "
            f"{f(at['specificity'])}, accuracy {f(at['accuracy'])}, precision {f(at['precision'])}, F1 {f(at['f1'])}"
        )
    click.echo(f"report and plots in {out}")


@click.command("export-runtime")
@click.argument("dataset", type=click.Path(path_type=Path))
@bundle_option("Model bundle to export (the ONNX files and their card entries are written into it).")
@LAYOUT
@click.option("--calibration-split", default="val", show_default=True, help="Images the int8 ranges come from.")
@click.option("--test-split", default="test", show_default=True, help="Images the gate is measured on.")
@click.option("--calibration-images", type=click.IntRange(8, 100000), default=128, show_default=True)
@click.option("--int8/--no-int8", default=True, show_default=True, help="Also an int8 (static) quantised graph.")
@click.option("--auroc-tolerance", type=click.FloatRange(0, 1), default=0.005, show_default=True)
@click.option("--probability-tolerance", type=click.FloatRange(0, 1), default=0.1, show_default=True)
@LOAD_WORKERS
@click.option("--json", "as_json", is_flag=True, help="Print the card's new runtimes as JSON.")
def export_runtime(
    dataset: Path,
    bundle: Path,
    layout: str,
    calibration_split: str,
    test_split: str,
    calibration_images: int,
    int8: bool,
    auroc_tolerance: float,
    probability_tolerance: float,
    load_workers: int,
    as_json: bool,
) -> None:
    """Export a bundle's network to ONNX Runtime (float32, and int8 calibrated on DATASET's calibration split),
    measure each against torch on the test split (AUROC and every input's probability), and record them in the
    card: the daemon's ``runtime: auto`` runs the fastest that passed. Exit 1 when none passed."""
    from fracwatch.lab.runtimes import ExportRequest, export_runtimes

    configure_logging("INFO")
    request = ExportRequest(
        bundle,
        dataset,
        layout,
        calibration_split,
        test_split,
        calibration_images,
        int8,
        auroc_tolerance,
        probability_tolerance,
        load_workers,
    )
    try:
        recorded = export_runtimes(request)
    except (FracwatchError, ValueError) as exc:
        fail(exc if isinstance(exc, FracwatchError) else FracwatchError(str(exc)))
    if as_json:
        click.echo(json.dumps({k: v.model_dump(mode="json") | {"passed": v.passed} for k, v in recorded.items()}))
    else:
        for name, entry in recorded.items():
            click.echo(
                f"{name}: test AUROC {entry.test_auroc:.4f} (torch {entry.reference_auroc:.4f}), largest probability "
                f"difference {entry.max_probability_difference:.4f}, {100 * entry.category_agreement:.1f} % of "
                f"images in the same category — {'passed' if entry.passed else 'FAILED'}"
            )
    if not any(entry.passed for entry in recorded.values()):
        sys.exit(EXIT_ERROR)


@click.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Folder for the ensemble bundle."
)
@click.option("--version", "version", required=True, help="The ensemble's version (its card's).")
@click.option("--name", help="The ensemble's name (default: the first bundle's).")
def ensemble(bundles: tuple[Path, ...], out: Path, version: str, name: str | None) -> None:
    """Combine two or more logit-map BUNDLES (same preprocessing and classes) into one bundle that averages their
    fracture maps. Then choose its operating points: fracwatch evaluate DATA --model OUT --split val
    --set-operating-points."""
    from fracwatch.model.ensemble import combine_bundles

    configure_logging("WARNING")
    try:
        card = combine_bundles(list(bundles), out, version, name)
    except FracwatchError as exc:
        fail(exc)
    members = ", ".join(f"{m['name']} {m['version']}" for m in card.training["members"])
    click.echo(f"{card.name} {card.version} ({members}) in {out}; Device UID {card.device_uid}")
    click.echo(card.training["operating_points"])


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--model",
    type=click.Path(path_type=Path, file_okay=False),
    help="Model bundle (default: configured, else shipped).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--runtime",
    type=click.Choice(["auto", "torch", "torch-bf16", "onnx", "onnx-int8"]),
    help="Where the network runs (default: the configured runtime, as the daemon scores): auto picks the fastest "
    "here of torch and the runtimes the bundle records as having passed their gate.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per file.")
@click.option(
    "--cam",
    "cam_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write a Grad-CAM overlay PNG per scored file into this directory.",
)
@click.option(
    "--pixel-spacing",
    type=click.FloatRange(min=0, min_open=True),
    help="Millimetres per pixel of the PNG/JPEG files (DICOM files' come from their headers): a bundle that tiles "
    "then scores them as the daemon scores DICOM images of that spacing.",
)
def predict(
    files: tuple[Path, ...],
    model: Path | None,
    device: str,
    runtime: str | None,
    as_json: bool,
    cam_dir: Path | None,
    pixel_spacing: float | None,
) -> None:
    """Score PNG, JPEG or DICOM files with the daemon's pipeline."""
    from fracwatch.model.bundle import load_bundle
    from fracwatch.model.runtimes import predictor_for
    from fracwatch.service.scoring import image_category, load_file, score_loaded, write_cam_pictures

    configure_logging("WARNING")
    settings = load(None)
    model_path = model or settings.model_path  # --model, else the configured or shipped bundle
    try:
        bundle = load_bundle(model_path)
        predictor = predictor_for(bundle, device, runtime=runtime or settings.runtime)
    except (FracwatchError, ValueError) as exc:
        fail(exc if isinstance(exc, FracwatchError) else FracwatchError(str(exc)))
    config = bundle.preprocess_config
    rules = bundle.scope  # the out-of-scope gate, as in the daemon
    loaded = [load_file(path, config, pixel_spacing, rules) if path.is_file() else _missing(path) for path in files]
    probabilities = score_loaded(loaded, predictor, config)
    cams: list[Path | None] = [None] * len(files)
    if cam_dir is not None:
        cams = write_cam_pictures([str(f) for f in files], loaded, probabilities, predictor, bundle, cam_dir)
    rows = []
    for path, image, probability, cam in zip(files, loaded, probabilities, cams, strict=True):
        rows.append(
            {
                "file": str(path),
                "probability": probability,
                "category": image_category(image, probability, bundle),
                "frames": image.frames,
                "error": image.error,
                "reason": image.skipped,  # why a skipped (out of scope) image was not scored
                "model": bundle.card.name,
                "model_version": bundle.card.version,
                "cam": str(cam) if cam is not None else None,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            p = f"{row['probability']:.3f}" if row["probability"] is not None else "-"
            why = row["error"] or row["reason"]
            click.echo(f"{row['category']:<8} p={p:<6} {row['file']}" + (f"  ({why})" if why else ""))
    if any(row["error"] for row in rows):
        sys.exit(EXIT_ERROR)


def _missing(path: Path) -> Any:
    from fracwatch.service.scoring import LoadedImage

    return LoadedImage(error=f"{path} does not exist")
