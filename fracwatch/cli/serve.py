"""``fracwatch serve`` (the daemon) and ``fracwatch echo`` (C-ECHO a peer)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from fracwatch import __version__
from fracwatch.cli.common import (
    EXIT_ERROR,
    LOGGER,
    configure_logging,
    fail,
    load,
    settings_options,
)
from fracwatch.config import DEFAULT_AE_TITLE
from fracwatch.errors import FracwatchError


@click.command()
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
@click.option(
    "--reuse-port",
    "reuse_port",
    flag_value=True,
    default=None,
    help="Share the DICOM port with other receiver processes on this host (SO_REUSEPORT; PostgreSQL only).",
)
@click.option("--http-port", type=int, help="HTTP port of the API and dashboard (default 8080).")
@click.option("--http-host", help="Address the HTTP side binds (default 127.0.0.1).")
@click.option("--no-http", "http_enabled", flag_value=False, default=None, help="Do not serve HTTP.")
@click.option("--retention-days", type=float, help="Delete spool files older than this (rows stay).")
@click.option("--workers", type=click.IntRange(0, 64), help="Scoring processes here (default 1; 0 = receive only).")
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
def serve(config_file: Path | None, **overrides: Any) -> None:
    """Run the daemon: receive studies, track them, score complete ones in worker processes."""
    from fracwatch.daemon import Daemon

    settings = load(config_file, **overrides)
    configure_logging(settings.log_level)
    LOGGER.info("fracwatch %s starting; data dir %s", __version__, settings.data_dir.resolve())
    try:
        Daemon(settings).run()
    except FracwatchError as exc:
        fail(exc)
    except OSError as exc:  # e.g. the port is taken
        fail(FracwatchError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"))


@click.command()
@settings_options
@click.option("--workers", type=click.IntRange(1, 64), help="Scoring processes on this host (default 1).")
@click.option("--model", type=click.Path(path_type=Path), help="Model bundle directory.")
@click.option(
    "--destination",
    "destinations",
    multiple=True,
    metavar="AE@HOST:PORT",
    help="Where results go (repeatable; the same as the receivers').",
)
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
def worker(config_file: Path | None, **overrides: Any) -> None:
    """Run jobs only (scoring, delivery, triage) for the receivers sharing this PostgreSQL database."""
    from fracwatch.daemon import Daemon
    from fracwatch.store.db import is_sqlite

    settings = load(config_file, **overrides)
    configure_logging(settings.log_level)
    try:
        daemon = Daemon(settings, receive=False)
        if is_sqlite(settings.database_url):
            daemon.start()  # refuses, in one line
        LOGGER.info("fracwatch %s worker starting; %d scoring processes", __version__, settings.workers)
        daemon.run()
    except FracwatchError as exc:
        fail(exc)


@click.command()
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--ae", "called_ae", default=DEFAULT_AE_TITLE, show_default=True, help="The peer's AE title.")
@click.option("--calling-ae", default=DEFAULT_AE_TITLE, show_default=True, help="Our AE title.")
@click.option("--timeout", type=float, default=10.0, show_default=True)
def echo(host: str, port: int, called_ae: str, calling_ae: str, timeout: float) -> None:
    """C-ECHO a DICOM peer (exit 0 on success)."""
    from fracwatch.dicom.scu import echo as send_echo

    configure_logging("WARNING")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the failure is reported below, in one line
    try:
        status = send_echo(host, port, called_ae, calling_ae, timeout)
    except FracwatchError as exc:
        fail(exc)
    if status != 0:
        click.echo(f"C-ECHO {called_ae}@{host}:{port}: status 0x{status:04X}", err=True)
        sys.exit(EXIT_ERROR)
    click.echo(f"C-ECHO {called_ae}@{host}:{port}: success")
