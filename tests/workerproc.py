"""``python -m tests.workerproc [fracwatch worker flags]``: a worker host whose scoring processes use the faulty
scorer of :mod:`tests.faults` (the real ``fracwatch worker`` cannot be given a test scorer)."""

from __future__ import annotations

import sys

import click

from fracwatch.cli.common import configure_logging, load, settings_options
from fracwatch.daemon import Daemon


@click.command()
@settings_options
@click.option("--workers", type=int)
@click.option("--model", type=click.Path())
@click.option("--destination", "destinations", multiple=True)
def main(config_file: object, **overrides: object) -> None:
    settings = load(None, **overrides)
    configure_logging(settings.log_level)
    Daemon(settings, receive=False, processor_factory="tests.faults:faulty").run()


if __name__ == "__main__":
    sys.exit(main())
