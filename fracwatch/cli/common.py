"""What every ``fracwatch`` command shares: logging set-up (from ``fracwatch.logs``), settings options, errors as
exit codes, output."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from fracwatch.config import Settings, load_settings
from fracwatch.domain import parse_time_bound
from fracwatch.errors import ConfigError, FracwatchError
from fracwatch.logs import configure_logging as configure_logging  # the commands import it from here

F = TypeVar("F", bound=Callable[..., Any])
EXIT_ERROR = 1
EXIT_CONFIG = 2
LOGGER = logging.getLogger("fracwatch")


def one_line(text: str) -> str:
    """A message as one line: a driver's multi-line text joined, SQLAlchemy's background link dropped."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(line for line in lines if not line.startswith("(Background on this error"))


def fail(exc: FracwatchError) -> NoReturn:
    """Print the error as one line on stderr and exit: 2 for a setting or usage, else 1."""
    click.echo(f"fracwatch: error: {one_line(str(exc))}", err=True)
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


def load(config_file: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config_file, **overrides)
    except ConfigError as exc:
        fail(exc)


def parse_day(value: str | None, option: str) -> datetime | None:
    """A ``--since`` / ``--until`` value (see :func:`fracwatch.domain.parse_time_bound`), or a usage error."""
    if value is None:
        return None
    try:
        return parse_time_bound(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD) or ISO timestamp", param_hint=option) from None


def echo_json(rows: Any) -> None:
    click.echo(json.dumps([dataclasses.asdict(r) for r in rows], default=json_default, indent=2))


def print_rows(
    fetch: Callable[[], Sequence[Any]], as_json: bool, empty: str, header: str | None, line: Callable[[Any], str]
) -> None:
    """Run a listing query; print its rows as a JSON array or as text lines (errors become exit codes)."""
    try:
        rows = fetch()
    except FracwatchError as exc:
        fail(exc)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(empty)
        return
    if header:
        click.echo(header)
    for row in rows:
        click.echo(line(row))


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


# train and evaluate: the images are decoded and preprocessed before any training or scoring starts
LOAD_WORKERS = click.option(
    "--workers",
    "load_workers",
    type=click.IntRange(0, 64),
    default=0,
    show_default=True,
    help="Processes that decode and preprocess the images (0: this one); the same tensors either way.",
)


def progress_printer() -> Callable[[str, int, int], None]:
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
