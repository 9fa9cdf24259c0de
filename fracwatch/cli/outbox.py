"""``fracwatch outbox`` and ``fracwatch resend``: deliveries of results to their destinations."""

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
from fracwatch.errors import FracwatchError


@click.command()
@settings_options
@click.option("--all", "show_all", is_flag=True, help="Include acknowledged deliveries.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def outbox(config_file: Path | None, show_all: bool, as_json: bool, **overrides: Any) -> None:
    """List pending and dead-letter deliveries of results."""
    from fracwatch.service.queries import outbox as list_outbox

    settings = load(config_file, **overrides)
    configure_logging("WARNING")
    states = ["pending", "dead", "sent"] if show_all else ["pending", "dead"]
    print_rows(lambda: list_outbox(settings, states), as_json, "outbox empty", None, _delivery_line)


def _delivery_line(row: Any) -> str:
    when = f"next {row.next_attempt_at:%Y-%m-%d %H:%M:%S}" if row.next_attempt_at else ""
    return (
        f"{row.state:<8} {row.destination:<32} study {row.study_instance_uid} {row.kind} {row.sop_instance_uid} "
        f"attempts {row.attempts} {when} {row.last_error or ''}"
    ).rstrip()


@click.command()
@settings_options
@click.argument("study_uid")
def resend(config_file: Path | None, study_uid: str, **overrides: Any) -> None:
    """Send STUDY_UID's latest SR again to every destination that has not acknowledged it."""
    from fracwatch.service.queries import resend as requeue

    settings = load(config_file, **overrides)
    configure_logging("WARNING")
    try:
        outcome = requeue(settings, study_uid)
    except LookupError as exc:
        fail(FracwatchError(str(exc).strip("'\"")))
    except FracwatchError as exc:
        fail(exc)
    click.echo(
        f"queued {outcome.requeued + outcome.added} deliveries "
        f"({outcome.already_acknowledged} destinations already acknowledged it and are skipped)"
    )
