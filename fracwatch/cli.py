"""The ``fracwatch`` command: thin commands that parse, call the service and translate errors to exit codes."""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from fracwatch import __version__
from fracwatch.config import DEFAULT_AE_TITLE, Settings, load_settings
from fracwatch.domain import StudyState
from fracwatch.errors import ConfigError, FracwatchError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 1
EXIT_CONFIG = 2

LOGGER = logging.getLogger("fracwatch")


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def configure_logging(level: str) -> None:
    """Log to stderr, UTC timestamps; pynetdicom and APScheduler only from WARNING up."""
    handler = logging.StreamHandler()
    handler.setFormatter(_UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pynetdicom", "apscheduler", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # A delivery kicked while the scheduled run is in progress is coalesced on purpose; APScheduler would log
    # each as a skipped execution.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)


def _fail(exc: FracwatchError) -> NoReturn:
    click.echo(f"fracwatch: error: {exc}", err=True)
    sys.exit(EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_ERROR)


def settings_options(func: F) -> F:
    """Options every command that touches the database or spool accepts."""
    func = click.option("--db", "db_url", metavar="URL", help="SQLAlchemy URL (default: SQLite file in the data dir).")(
        func
    )
    func = click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="Spool and default SQLite location (default ./var).",
    )(func)
    func = click.option(
        "--config",
        "config_file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="TOML configuration file (default $FRACWATCH_CONFIG).",
    )(func)
    return func


def _load(config_file: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config_file, **overrides)
    except ConfigError as exc:
        _fail(exc)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fracwatch")
def cli() -> None:
    """fracwatch: triage X-ray studies for bone fractures beside a PACS."""


@cli.command()
@settings_options
@click.option("--ae-title", help="Our AE title (default FRACWATCH).")
@click.option("--host", help="Address to listen on (default 0.0.0.0).")
@click.option("--port", type=int, help="DICOM port (default 11112).")
@click.option("--stable-after", type=float, metavar="SECONDS", help="Quiet period before a study is complete.")
@click.option(
    "--destination",
    "destinations",
    multiple=True,
    metavar="AE@HOST:PORT",
    help="Where results go (repeatable).",
)
@click.option("--model", type=click.Path(path_type=Path), help="Model bundle directory.")
@click.option("--allow-ae", "allowed_calling_aets", multiple=True, metavar="AE", help="Accept only these callers.")
@click.option("--max-pdu", type=int, help="Maximum PDU size we receive, bytes (0 = unlimited).")
@click.option("--max-associations", type=int, help="Concurrent associations.")
@click.option("--http-port", type=int, help="HTTP port of the API and dashboard (default 8080).")
@click.option("--http-host", help="Address the HTTP side binds (default 127.0.0.1).")
@click.option("--no-http", "http_enabled", flag_value=False, default=None, help="Do not serve HTTP.")
@click.option("--retention-days", type=float, help="Delete spool files older than this (rows stay).")
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
def serve(config_file: Path | None, **overrides: Any) -> None:
    """Run the daemon: receive studies, track them, hand complete ones to the worker."""
    from fracwatch.service.daemon import Daemon

    settings = _load(config_file, **overrides)
    configure_logging(settings.log_level)
    LOGGER.info("fracwatch %s starting; data dir %s", __version__, settings.data_dir.resolve())
    try:
        Daemon(settings).run()
    except FracwatchError as exc:
        _fail(exc)
    except OSError as exc:  # e.g. the port is taken
        _fail(FracwatchError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"))


@cli.group("db")
def db_group() -> None:
    """Database administration."""


@db_group.command("upgrade")
@settings_options
def db_upgrade(config_file: Path | None, **overrides: Any) -> None:
    """Create or migrate the database schema to the newest revision."""
    from fracwatch.service.queries import upgrade_database

    settings = _load(config_file, **overrides)
    configure_logging("WARNING")
    try:
        revision = upgrade_database(settings)
    except FracwatchError as exc:
        _fail(exc)
    click.echo(f"database at revision {revision}")


def _parse_day(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD) or ISO timestamp", param_hint=option) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _until(value: str | None) -> datetime | None:
    """``--until``: a bare date includes that whole day."""
    parsed = _parse_day(value, "--until")
    if value and parsed and len(value) == 10:
        parsed += timedelta(days=1)
    return parsed


def _echo_json(rows: Any) -> None:
    click.echo(json.dumps([dataclasses.asdict(r) for r in rows], default=_json_default, indent=2))


def _print_rows(
    fetch: Callable[[], Sequence[Any]], as_json: bool, empty: str, header: str | None, line: Callable[[Any], str]
) -> None:
    """Run a listing query; print its rows as a JSON array or as text lines (errors become exit codes)."""
    try:
        rows = fetch()
    except FracwatchError as exc:
        _fail(exc)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo(empty)
        return
    if header:
        click.echo(header)
    for row in rows:
        click.echo(line(row))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


@cli.command()
@settings_options
@click.option("--since", help="Received on or after this date/time (UTC), e.g. 2026-11-01.")
@click.option("--until", help="Received before this date/time (UTC).")
@click.option("--today", is_flag=True, help="Received since midnight UTC.")
@click.option("--state", type=click.Choice([s.value for s in StudyState]), help="Only studies in this state.")
@click.option("--accession", help="Only studies with this accession number.")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def studies(
    config_file: Path | None,
    since: str | None,
    until: str | None,
    today: bool,
    state: str | None,
    accession: str | None,
    limit: int,
    as_json: bool,
    **overrides: Any,
) -> None:
    """List recent studies with their state and instance count."""
    from fracwatch.service.queries import recent_studies
    from fracwatch.store.repository import StudyFilter

    settings = _load(config_file, **overrides)
    configure_logging("WARNING")
    received_since = _parse_day(since, "--since")
    if today:
        received_since = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    filters = StudyFilter(received_since, _until(until), state, accession, limit)
    _print_rows(
        lambda: recent_studies(settings, filters),
        as_json,
        "no studies",
        f"{'STUDY INSTANCE UID':<64}  {'STATE':<9}  {'V':>2}  {'INST':>4}  {'MOD':<7}  LAST RECEIVED (UTC)",
        lambda row: (
            f"{row.study_instance_uid:<64}  {row.state:<9}  {row.version:>2}  {row.instances:>4}  "
            f"{(row.modality or '-'):<7}  {row.last_received_at:%Y-%m-%d %H:%M:%S}"
        ),
    )


@cli.command()
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--ae", "called_ae", default=DEFAULT_AE_TITLE, show_default=True, help="The peer's AE title.")
@click.option("--calling-ae", default=DEFAULT_AE_TITLE, show_default=True, help="Our AE title.")
@click.option("--timeout", type=float, default=10.0, show_default=True)
def echo(host: str, port: int, called_ae: str, calling_ae: str, timeout: float) -> None:
    """C-ECHO a DICOM peer (exit 0 on success)."""
    from fracwatch.dicom.scu import echo as send_echo

    configure_logging("WARNING")
    try:
        status = send_echo(host, port, called_ae, calling_ae, timeout)
    except FracwatchError as exc:
        _fail(exc)
    if status != 0:
        click.echo(f"C-ECHO {called_ae}@{host}:{port}: status 0x{status:04X}", err=True)
        sys.exit(EXIT_ERROR)
    click.echo(f"C-ECHO {called_ae}@{host}:{port}: success")


# train and evaluate: the images are decoded and preprocessed before any training or scoring starts
LOAD_WORKERS = click.option(
    "--workers",
    "load_workers",
    type=click.IntRange(0, 64),
    default=0,
    show_default=True,
    help="Processes that decode and preprocess the images (0: this one); the same tensors either way.",
)


def _progress_printer() -> Callable[[str, int, int], None]:
    """A progress line per stage on stderr (a bar when stderr is a terminal)."""
    state: dict[str, Any] = {"stage": None, "bar": None}

    def update(stage: str, done: int, total: int) -> None:
        if state["stage"] != stage:
            if state["bar"] is not None:
                state["bar"].render_finish()
            state["stage"] = stage
            state["bar"] = click.progressbar(length=total, label=stage, file=sys.stderr)
            state["shown"] = 0
        bar = state["bar"]
        bar.update(done - state["shown"])
        state["shown"] = done
        if done >= total:
            bar.render_finish()

    return update


@cli.command()
@click.argument("dataset", required=False, type=click.Path(path_type=Path))
@click.option("--phantom", is_flag=True, help="Train on 2-D procedural phantoms (the bootstrap data set).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Bundle directory.")
@click.option(
    "--layout", type=click.Choice(["auto", "manifest", "folder", "csv", "dicom"]), default="auto", show_default=True
)
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
    "(a 256-px bfloat16 step 0.51-0.66x the time on AVX512-BF16 and AMX CPUs; at full scale no accuracy gain, see the "
    "README); ResNet presets.",
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
    from fracwatch.model.networks import PRESETS
    from fracwatch.model.training import TrainConfig, config_problem, train_phantom_bundle
    from fracwatch.service.modelops import TrainRequest, train_from_dataset

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
            card = train_from_dataset(request, _progress_printer())
    except (FracwatchError, ValueError) as exc:
        _fail(exc if isinstance(exc, FracwatchError) else FracwatchError(str(exc)))
    cv = card.training.get("cross_validation")
    click.echo(
        f"bundle {out}: validation AUROC {card.metrics['validation_auroc']:.4f}, "
        f"doubt ≥ {card.operating_points.doubt:.3f}, positive ≥ {card.operating_points.positive:.3f}"
        + (f"; {folds}-fold AUROC {cv['auroc_mean']:.4f} ± {cv['auroc_sd']:.4f}" if cv else "")
    )


@cli.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option(
    "--model",
    "bundle",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Model bundle to evaluate.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder for report.json and the plots.",
)
@click.option("--split", help="Only this split (default: test when the data set has one, else everything).")
@click.option(
    "--layout", type=click.Choice(["auto", "manifest", "folder", "csv", "dicom"]), default="auto", show_default=True
)
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
    from fracwatch.service.modelops import EvaluateRequest, evaluate_bundle

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
        report = evaluate_bundle(request, _progress_printer())
    except (FracwatchError, ValueError) as exc:
        _fail(exc if isinstance(exc, FracwatchError) else FracwatchError(str(exc)))
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


@cli.command()
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
        _fail(exc)
    members = ", ".join(f"{m['name']} {m['version']}" for m in card.training["members"])
    click.echo(f"{card.name} {card.version} ({members}) in {out}; Device UID {card.device_uid}")
    click.echo(card.training["operating_points"])


@cli.command()
@settings_options
@click.option("--since", help="Scored on or after this date/time (UTC).")
@click.option("--until", help="Scored before this date/time (UTC).")
@click.option("--category", type=click.Choice(["positive", "doubt", "negative", "error"]))
@click.option("--accession", help="Only studies with this accession number.")
@click.option("--study", "study_uid", help="Only this Study Instance UID.")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def results(
    config_file: Path | None,
    since: str | None,
    until: str | None,
    category: str | None,
    accession: str | None,
    study_uid: str | None,
    limit: int,
    as_json: bool,
    **overrides: Any,
) -> None:
    """List scored studies: category, probability, model version, turnaround."""
    from fracwatch.service.queries import scored_results
    from fracwatch.store.repository import ResultFilter

    settings = _load(config_file, **overrides)
    configure_logging("WARNING")
    filters = ResultFilter(_parse_day(since, "--since"), _until(until), category, accession, study_uid, limit)
    _print_rows(
        lambda: scored_results(settings, filters),
        as_json,
        "no results",
        f"{'STUDY INSTANCE UID':<64}  {'CATEGORY':<8}  {'P':>5}  {'MODEL':<20}  {'TURNAROUND':>10}  SCORED (UTC)",
        _result_line,
    )


def _result_line(row: Any) -> str:
    probability = f"{row.probability:.3f}" if row.probability is not None else "-"
    turnaround = f"{row.turnaround_seconds:.1f} s" if row.turnaround_seconds is not None else "-"
    return (
        f"{row.study_instance_uid:<64}  {row.category:<8}  {probability:>5}  "
        f"{row.model_version:<20}  {turnaround:>10}  {row.scored_at:%Y-%m-%d %H:%M:%S}"
    )


@cli.command()
@settings_options
@click.option("--all", "show_all", is_flag=True, help="Include acknowledged deliveries.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def outbox(config_file: Path | None, show_all: bool, as_json: bool, **overrides: Any) -> None:
    """List pending and dead-letter deliveries of results."""
    from fracwatch.service.queries import outbox as list_outbox

    settings = _load(config_file, **overrides)
    configure_logging("WARNING")
    states = ["pending", "dead", "sent"] if show_all else ["pending", "dead"]
    _print_rows(lambda: list_outbox(settings, states), as_json, "outbox empty", None, _delivery_line)


def _delivery_line(row: Any) -> str:
    when = f"next {row.next_attempt_at:%Y-%m-%d %H:%M:%S}" if row.next_attempt_at else ""
    return (
        f"{row.state:<8} {row.destination:<32} study {row.study_instance_uid} {row.kind} {row.sop_instance_uid} "
        f"attempts {row.attempts} {when} {row.last_error or ''}"
    ).rstrip()


@cli.command()
@settings_options
@click.argument("study_uid")
def resend(config_file: Path | None, study_uid: str, **overrides: Any) -> None:
    """Send STUDY_UID's latest SR again to every destination that has not acknowledged it."""
    from fracwatch.service.queries import resend as requeue

    settings = _load(config_file, **overrides)
    configure_logging("WARNING")
    try:
        outcome = requeue(settings, study_uid)
    except LookupError as exc:
        _fail(FracwatchError(str(exc).strip("'\"")))
    except FracwatchError as exc:
        _fail(exc)
    click.echo(
        f"queued {outcome.requeued + outcome.added} deliveries "
        f"({outcome.already_acknowledged} destinations already acknowledged it and are skipped)"
    )


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--model",
    type=click.Path(path_type=Path, file_okay=False),
    help="Model bundle (default: configured, else shipped).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
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
    as_json: bool,
    cam_dir: Path | None,
    pixel_spacing: float | None,
) -> None:
    """Score PNG, JPEG or DICOM files with the daemon's pipeline."""
    from fracwatch.model.bundle import load_bundle
    from fracwatch.model.predictor import Predictor
    from fracwatch.service.scoring import load_file, score_loaded, write_cam_pictures

    configure_logging("WARNING")
    model_path = model or _load(None).model_path  # --model, else the configured or shipped bundle
    try:
        bundle = load_bundle(model_path)
        predictor = Predictor(bundle.network, device)
    except (FracwatchError, ValueError) as exc:
        _fail(exc if isinstance(exc, FracwatchError) else FracwatchError(str(exc)))
    config = bundle.preprocess_config
    loaded = [load_file(path, config, pixel_spacing) if path.is_file() else _missing(path) for path in files]
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
                "category": bundle.category(probability) if probability is not None else "error",
                "frames": image.frames,
                "error": image.error,
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
            click.echo(f"{row['category']:<8} p={p:<6} {row['file']}" + (f"  ({row['error']})" if row["error"] else ""))
    if any(row["error"] for row in rows):
        sys.exit(EXIT_ERROR)


def _missing(path: Path) -> Any:
    from fracwatch.service.scoring import LoadedImage

    return LoadedImage(error=f"{path} does not exist")


@cli.command()
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
    )
    if phantom and (first_pose or splits or append):
        raise click.UsageError("--first-pose, --splits and --append apply to DRRs, not --phantom")
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
        _fail(exc)
    click.echo(f"wrote {count * per_pose} images ({'appended to' if append else 'manifest'} {manifest})")


@cli.group("token")
def token_group() -> None:
    """API tokens for the HTTP API and dashboard (roles: viewer, admin)."""


@token_group.command("create")
@settings_options
@click.option("--role", type=click.Choice(["viewer", "admin"]), required=True, help="What the token may do.")
@click.option("--name", help="A name for the token (who or what holds it); default: role-<timestamp>.")
def token_create(config_file: Path | None, role: str, name: str | None, **overrides: Any) -> None:
    """Create a token and print it once: only its SHA-256 is stored."""
    from fracwatch.service.queries import create_token

    settings = _load(config_file, **overrides)
    configure_logging("WARNING")
    label = name or f"{role}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    try:
        token = create_token(settings, label, role)
    except FracwatchError as exc:
        _fail(exc)
    click.echo(token)
    click.echo(f"token {label!r} ({role}) created; it is shown only now", err=True)


@token_group.command("revoke")
@settings_options
@click.argument("name")
def token_revoke(config_file: Path | None, name: str, **overrides: Any) -> None:
    """Revoke the token called NAME; it stops working at once."""
    from fracwatch.service.queries import revoke_token

    settings = _load(config_file, **overrides)
    configure_logging("WARNING")
    try:
        revoke_token(settings, name)
    except FracwatchError as exc:
        _fail(exc)
    click.echo(f"token {name!r} revoked")


@token_group.command("list")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def token_list(config_file: Path | None, as_json: bool, **overrides: Any) -> None:
    """List tokens: name, role, created, last used, revoked (never the token)."""
    from fracwatch.service.queries import tokens

    settings = _load(config_file, **overrides)
    configure_logging("WARNING")

    def line(t: Any) -> str:
        state = f"revoked {t.revoked_at:%Y-%m-%d}" if t.revoked_at else "active"
        used = f"last used {t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never used"
        return f"{t.name:<24} {t.role:<7} created {t.created_at:%Y-%m-%d} {used:<27} {state}"

    _print_rows(lambda: tokens(settings), as_json, "no tokens", None, line)


@cli.command()
@settings_options
@click.option("--days", type=float, help="Age limit in days (default: the retention_days setting).")
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print a JSON array.")
def purge(config_file: Path | None, days: float | None, dry_run: bool, as_json: bool, **overrides: Any) -> None:
    """Delete spool files older than the retention period; database rows stay, marked purged."""
    from fracwatch.service.queries import purge_now, purge_preview

    settings = _load(config_file, **overrides)
    configure_logging("WARNING")
    limit = days if days is not None else settings.retention_days
    if limit is None or limit <= 0:
        _fail(ConfigError("no retention period: pass --days N or set retention_days"))
    if dry_run:

        def line(item: Any) -> str:
            return f"{item.at:%Y-%m-%d %H:%M:%S} {item.kind:<8} study {item.study_instance_uid} {item.path}"

        _print_rows(lambda: purge_preview(settings, limit), as_json, "nothing to purge", None, line)
        return
    try:
        count = purge_now(settings, limit)
    except FracwatchError as exc:
        _fail(exc)
    click.echo(f"purged {count} files older than {limit:g} days")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fracwatch")
