"""``fracwatch studies`` and ``fracwatch results``: what the result database holds."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from fracwatch.cli.common import (
    configure_logging,
    fail,
    load,
    parse_day,
    print_rows,
    settings_options,
)
from fracwatch.domain import StudyState


@click.command()
@settings_options
@click.option("--since", help="First received on or after this date/time (UTC), e.g. 2026-11-01.")
@click.option("--until", help="First received before this date/time (UTC); a bare date is its midnight.")
@click.option("--today", is_flag=True, help="First received since midnight UTC.")
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
    from fracwatch.store.search import StudyQuery

    settings = load(config_file, **overrides)
    configure_logging("WARNING")
    received_since = parse_day(since, "--since")
    if today:
        received_since = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    filters = StudyQuery(
        received_since=received_since,
        received_until=parse_day(until, "--until"),
        state=state,
        accession_number=accession,
        limit=limit,
    )
    print_rows(
        lambda: recent_studies(settings, filters),
        as_json,
        "no studies",
        f"{'STUDY INSTANCE UID':<64}  {'STATE':<9}  {'V':>2}  {'INST':>4}  {'MOD':<7}  LAST RECEIVED (UTC)",
        lambda row: (
            f"{row.study_instance_uid:<64}  {row.state:<9}  {row.version:>2}  {row.instances:>4}  "
            f"{(row.modality or '-'):<7}  {row.last_received_at:%Y-%m-%d %H:%M:%S}"
        ),
    )


@click.command()
@settings_options
@click.option("--since", help="Scored on or after this date/time (UTC).")
@click.option("--until", help="Scored before this date/time (UTC); a bare date is its midnight.")
@click.option("--category", type=click.Choice(["positive", "doubt", "negative", "error", "skipped"]))
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
    from fracwatch.store.results import ResultFilter

    settings = load(config_file, **overrides)
    configure_logging("WARNING")
    filters = ResultFilter(
        parse_day(since, "--since"), parse_day(until, "--until"), category, accession, study_uid, limit
    )
    print_rows(
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


@click.command()
@settings_options
@click.argument("study_uid")
def requeue(config_file: Path | None, study_uid: str, **overrides: Any) -> None:
    """Score a dead-lettered (failed) study again, once its cause is fixed (at the daemon's next completion tick)."""
    from fracwatch.errors import FracwatchError
    from fracwatch.service.queries import requeue_failed

    settings = load(config_file, **overrides)
    configure_logging("WARNING")
    try:
        version = requeue_failed(settings, study_uid)
    except FracwatchError as exc:
        fail(exc)
    if version is None:
        fail(FracwatchError(f"study {study_uid} is not in state failed"))
    click.echo(f"study {study_uid} version {version} queued for scoring again")
