"""The ``fracwatch`` command: thin commands that parse, call the service and translate errors to exit codes."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

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


def _fail(exc: FracwatchError) -> None:
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
        raise  # unreachable


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
    received_until = _parse_day(until, "--until")
    if until and received_until and len(until) == 10:  # a bare date includes that whole day
        received_until += timedelta(days=1)
    filters = StudyFilter(received_since, received_until, state, accession, limit)
    try:
        rows = recent_studies(settings, filters)
    except FracwatchError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in rows], default=_json_default, indent=2))
        return
    if not rows:
        click.echo("no studies")
        return
    click.echo(f"{'STUDY INSTANCE UID':<64}  {'STATE':<9}  {'V':>2}  {'INST':>4}  {'MOD':<7}  LAST RECEIVED (UTC)")
    for row in rows:
        click.echo(
            f"{row.study_instance_uid:<64}  {row.state:<9}  {row.version:>2}  {row.instances:>4}  "
            f"{(row.modality or '-'):<7}  {row.last_received_at:%Y-%m-%d %H:%M:%S}"
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


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fracwatch")
