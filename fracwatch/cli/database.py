"""``fracwatch db upgrade`` and ``fracwatch purge``: the database schema and the retention of spool files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fracwatch.cli.common import (
    configure_logging,
    fail,
    load,
    print_rows,
    settings_options,
)
from fracwatch.errors import ConfigError, FracwatchError


@click.group("db")
def db_group() -> None:
    """Database administration."""


@db_group.command("upgrade")
@settings_options
def db_upgrade(config_file: Path | None, **overrides: Any) -> None:
    """Create or migrate the database schema to the newest revision."""
    from fracwatch.service.queries import upgrade_database

    settings = load(config_file, **overrides)
    configure_logging("WARNING")
    try:
        revision = upgrade_database(settings)
    except FracwatchError as exc:
        fail(exc)
    click.echo(f"database at revision {revision}")


@click.command()
@settings_options
@click.option("--days", type=float, help="Age limit in days (default: the retention_days setting).")
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print a JSON array.")
def purge(config_file: Path | None, days: float | None, dry_run: bool, as_json: bool, **overrides: Any) -> None:
    """Delete spool files older than the retention period; database rows stay, marked purged."""
    from fracwatch.service.queries import purge_now, purge_preview

    settings = load(config_file, **overrides)
    configure_logging("WARNING")
    limit = days if days is not None else settings.retention_days
    if limit is None or limit <= 0:
        fail(ConfigError("no retention period: pass --days N or set retention_days"))
    if dry_run:

        def line(item: Any) -> str:
            return f"{item.at:%Y-%m-%d %H:%M:%S} {item.kind:<8} study {item.study_instance_uid} {item.path}"

        print_rows(lambda: purge_preview(settings, limit), as_json, "nothing to purge", None, line)
        return
    try:
        count = purge_now(settings, limit)
    except FracwatchError as exc:
        fail(exc)
    click.echo(f"purged {count} files older than {limit:g} days")
