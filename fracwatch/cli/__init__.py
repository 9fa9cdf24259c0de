"""The ``fracwatch`` command: thin commands that parse, call the service and translate errors to exit codes.

One module per command group; the options and helpers they share are in :mod:`fracwatch.cli.common`.
"""

from __future__ import annotations

import click

from fracwatch import __version__
from fracwatch.cli import database, model, outbox, serve, studies, synth, tokens
from fracwatch.cli.common import configure_logging

__all__ = ["cli", "configure_logging", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fracwatch")
def cli() -> None:
    """fracwatch: triage X-ray studies for bone fractures beside a PACS."""


for _command in (
    serve.serve,
    serve.worker,
    database.db_group,
    studies.studies,
    serve.echo,
    model.train,
    model.evaluate,
    model.ensemble,
    model.export_runtime,
    studies.results,
    studies.requeue,
    outbox.outbox,
    outbox.resend,
    model.predict,
    synth.synth,
    tokens.token_group,
    database.purge,
):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fracwatch")
