"""``fracwatch token create / revoke / list``: API and dashboard sign-in tokens."""

from __future__ import annotations

from datetime import UTC, datetime
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
from fracwatch.errors import FracwatchError


@click.group("token")
def token_group() -> None:
    """API tokens for the HTTP API and dashboard (roles: viewer, admin)."""


@token_group.command("create")
@settings_options
@click.option("--role", type=click.Choice(["viewer", "admin"]), required=True, help="What the token may do.")
@click.option("--name", help="A name for the token (who or what holds it); default: role-<timestamp>.")
def token_create(config_file: Path | None, role: str, name: str | None, **overrides: Any) -> None:
    """Create a token and print it once: only its SHA-256 is stored."""
    from fracwatch.service.queries import create_token

    settings = load(config_file, **overrides)
    configure_logging("WARNING")
    label = name or f"{role}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    try:
        token = create_token(settings, label, role)
    except FracwatchError as exc:
        fail(exc)
    click.echo(token)
    click.echo(f"token {label!r} ({role}) created; it is shown only now", err=True)


@token_group.command("revoke")
@settings_options
@click.argument("name")
def token_revoke(config_file: Path | None, name: str, **overrides: Any) -> None:
    """Revoke the token called NAME; it stops working at once."""
    from fracwatch.service.queries import revoke_token

    settings = load(config_file, **overrides)
    configure_logging("WARNING")
    try:
        revoke_token(settings, name)
    except FracwatchError as exc:
        fail(exc)
    click.echo(f"token {name!r} revoked")


@token_group.command("list")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def token_list(config_file: Path | None, as_json: bool, **overrides: Any) -> None:
    """List tokens: name, role, created, last used, revoked (never the token)."""
    from fracwatch.service.queries import tokens

    settings = load(config_file, **overrides)
    configure_logging("WARNING")

    def line(t: Any) -> str:
        state = f"revoked {t.revoked_at:%Y-%m-%d}" if t.revoked_at else "active"
        used = f"last used {t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never used"
        return f"{t.name:<24} {t.role:<7} created {t.created_at:%Y-%m-%d} {used:<27} {state}"

    print_rows(lambda: tokens(settings), as_json, "no tokens", None, line)
