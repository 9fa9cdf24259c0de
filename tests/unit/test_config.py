"""Settings precedence and validation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fracwatch.config import Destination, load_settings
from fracwatch.errors import ConfigError


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRACWATCH_CONFIG", raising=False)
    settings = load_settings()
    assert settings.ae_title == "FRACWATCH"
    assert settings.port == 11112
    assert settings.data_dir == Path("./var").absolute()  # made absolute once, at load
    assert settings.stable_after == 30
    assert settings.max_pdu == 131072
    assert settings.database_url == f"sqlite:///{(Path('./var') / 'fracwatch.db').resolve()}"


def test_file_then_environment_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "fw.toml"
    config.write_text('ae_title = "FILE_AE"\nport = 104\nstable_after = 10\ndestinations = ["PACS@pacs.local:104"]\n')
    monkeypatch.setenv("FRACWATCH_PORT", "2104")
    monkeypatch.setenv("FRACWATCH_STABLE_AFTER", "20")
    settings = load_settings(config, stable_after=5.0, host=None)
    assert settings.ae_title == "FILE_AE"  # file
    assert settings.port == 2104  # environment beats file
    assert settings.stable_after == 5.0  # flag beats environment
    assert settings.destinations == [Destination(ae_title="PACS", host="pacs.local", port=104)]


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "fw.toml"
    config.write_text('ae_title = "ENVFILE"\n')
    monkeypatch.setenv("FRACWATCH_CONFIG", str(config))
    assert load_settings().ae_title == "ENVFILE"


def test_example_file_documents_every_key() -> None:
    example = Path(__file__).parents[2] / "config" / "fracwatch.example.toml"
    settings = load_settings(example)
    text = example.read_text()
    for key in type(settings).model_fields:
        assert f"{key} =" in text, f"{key} is not documented in the example configuration"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"port": 70000}, "port"),
        ({"ae_title": "A" * 17}, "ae_title"),
        ({"ae_title": "BAD\\AE"}, "ae_title"),
        ({"stable_after": -1}, "stable_after"),
        ({"destinations": ["nonsense"]}, "destinations.0"),
        ({"destinations": ["PACS@host:99999"]}, "destinations.0"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"triage_hl7": ["ris.example.org"]}, "triage_hl7.0"),
        ({"triage_webhooks": ["ftp://ris/hook"]}, "triage_webhooks.0"),
        ({"triage_categories": ["negative"]}, "triage_categories.0"),
        ({"http_port": 0}, "http_port"),
        ({"retention_days": 0}, "retention_days"),
    ],
)
def test_invalid_values_name_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid setting '{re.escape(key)}"):
        load_settings(None, **kwargs)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    config = tmp_path / "fw.toml"
    config.write_text("prot = 104\n")
    with pytest.raises(ConfigError, match="invalid setting 'prot': unknown setting"):
        load_settings(config)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)


def test_bad_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRACWATCH_PORT", "eleven")
    with pytest.raises(ConfigError, match="'port'"):
        load_settings()
    monkeypatch.delenv("FRACWATCH_PORT")
    monkeypatch.setenv("FRACWATCH_DESTINATIONS", "PACS@h:104")  # not JSON
    with pytest.raises(ConfigError, match="destinations"):
        load_settings()


def test_unknown_environment_variable_stops_like_an_unknown_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRACWATCH_STABLE_AFER", "3")  # a typo once silently ignored
    with pytest.raises(ConfigError, match=r"FRACWATCH_STABLE_AFER.*did you mean FRACWATCH_STABLE_AFTER"):
        load_settings()
    monkeypatch.delenv("FRACWATCH_STABLE_AFER")
    monkeypatch.setenv("FRACWATCH_STABLE_AFTER", "3")
    assert load_settings().stable_after == 3.0


def test_destination_parse_ipv6() -> None:
    assert Destination.parse("PACS@[::1]:104") == Destination(ae_title="PACS", host="::1", port=104)
    assert str(Destination.parse("PACS@10.0.0.1:104")) == "PACS@10.0.0.1:104"


def test_studies_a_scoring_batch_takes_default_to_eight_on_a_gpu_and_one_on_a_cpu(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path)
    assert (settings.batch_studies("cuda"), settings.batch_studies("cpu")) == (8, 1)
    chosen = load_settings(None, data_dir=tmp_path, max_batch_studies=3)
    assert (chosen.batch_studies("cuda"), chosen.batch_studies("cpu")) == (3, 3)
