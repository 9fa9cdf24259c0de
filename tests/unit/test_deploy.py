"""The deploy files parse, lint where a linter runs here, and their command lines match the real CLI."""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from fracwatch.cli import cli

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def parses_as_fracwatch_command(args: list[str]) -> None:
    """Fail unless ``fracwatch ARGS`` names a real command with real options (nothing is run)."""
    name, *rest = args
    command = cli.get_command(click.Context(cli), name)
    assert command is not None, f"fracwatch has no command {name!r}"
    command.make_context(name, list(rest))  # raises click.UsageError on an unknown option


def test_systemd_unit_matches_the_cli() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "fracwatch.service")
    exec_start = shlex.split(unit["Service"]["ExecStart"])
    assert exec_start[0].endswith("/fracwatch")
    parses_as_fracwatch_command(exec_start[1:])
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    assert "/var/lib/fracwatch" in exec_start


def test_systemd_unit_verifies() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run([tool, "verify", str(DEPLOY / "fracwatch.service")], capture_output=True, text=True)
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "is not executable" not in line and "No such file" not in line
    ]
    assert problems == [], problems


def test_dockerfile() -> None:
    parser = DockerfileParser(path=str(DEPLOY / "Dockerfile"))
    instructions = [i["instruction"] for i in parser.structure if i["instruction"] != "COMMENT"]
    assert instructions[0] == "FROM" and parser.baseimage.startswith("python:3.11")
    assert "USER" in instructions and "HEALTHCHECK" in instructions
    runs = " ".join(i["value"] for i in parser.structure if i["instruction"] == "RUN")
    assert "download.pytorch.org/whl/cpu" in runs and "torch==2.13.0" in runs and "-c constraints.txt" in runs
    entrypoint = json.loads(next(i["value"] for i in parser.structure if i["instruction"] == "ENTRYPOINT"))
    command = json.loads(next(i["value"] for i in parser.structure if i["instruction"] == "CMD"))
    assert entrypoint == ["fracwatch"]
    parses_as_fracwatch_command(command)
    healthcheck = next(i["value"] for i in parser.structure if i["instruction"] == "HEALTHCHECK")
    check = json.loads(healthcheck[healthcheck.index("[") :])
    assert check[0] == "fracwatch"
    parses_as_fracwatch_command(check[1:])
    for source in ("pyproject.toml", "constraints.txt", "fracwatch", "alembic", "models"):
        assert (DEPLOY.parent / source).exists()


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"fracwatch", "receiver", "worker", "orthanc", "postgres"}
    for name in ("fracwatch", "receiver", "worker"):  # every process on the one PostgreSQL database and spool
        service = compose["services"][name]
        parses_as_fracwatch_command(service["command"])
        assert service["environment"]["FRACWATCH_DB_URL"].startswith("postgresql+psycopg://")
        assert "fracwatch-data:/var/lib/fracwatch" in service["volumes"]
    assert compose["services"]["worker"]["command"][0] == "worker"
    lua = compose["services"]["orthanc"]["volumes"][0].split(":")[0]
    assert (DEPLOY / lua).is_file()
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose not found: install the Debian package docker-compose (it validates the file)"
    result = subprocess.run(
        [tool, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "POSTGRES_PASSWORD": "check"},
    )
    assert result.returncode == 0, result.stderr
