"""One Settings type: defaults < TOML file < ``FRACWATCH_*`` environment < explicit overrides (CLI flags).

No instance is created at import; call :func:`load_settings`.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fracwatch.errors import ConfigError

ENV_PREFIX = "FRACWATCH_"
CONFIG_ENV = "FRACWATCH_CONFIG"
DEFAULT_AE_TITLE = "FRACWATCH"
DEFAULT_PORT = 11112
DEFAULT_DATA_DIR = Path("./var")
DB_FILENAME = "fracwatch.db"

_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: printable ASCII, no backslash
_DESTINATION_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@\s]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


def validate_ae_title(value: str) -> str:
    """Return ``value`` stripped, or raise ``ValueError`` if it is not a valid DICOM AE title."""
    stripped = value.strip()
    if not _AE_TITLE_RE.match(stripped):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return stripped


AETitle = Annotated[str, BeforeValidator(lambda v: validate_ae_title(str(v)))]


class Destination(BaseModel):
    """A DICOM peer fracwatch sends its results to."""

    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AE@HOST:PORT``."""
        match = _DESTINATION_RE.match(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not of the form AE@HOST:PORT")
        host = match["host"].strip("[]")
        return cls(ae_title=match["ae"], host=host, port=int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _parse_destination(value: Any) -> Any:
    return Destination.parse(value) if isinstance(value, str) else value


class HL7Endpoint(BaseModel):
    """An MLLP listener (a RIS or an interface engine) that takes ORU^R01 triage messages."""

    host: str
    port: int = Field(ge=1, le=65535)

    @classmethod
    def parse(cls, text: str) -> HL7Endpoint:
        """Parse ``HOST:PORT``."""
        host, sep, port = text.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{text!r} is not of the form HOST:PORT")
        return cls(host=host.strip("[]"), port=int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _parse_hl7(value: Any) -> Any:
    return HL7Endpoint.parse(value) if isinstance(value, str) else value


def _check_url(value: Any) -> Any:
    text = str(value).strip()
    if not re.match(r"^https?://[^\s/]+", text):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return text


GPU_BATCH_STUDIES = 8  # max_batch_studies' default where the scoring processes run on a GPU


class Settings(BaseSettings):
    """Every fracwatch setting. ``config/fracwatch.example.toml`` documents each key."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # where things live
    data_dir: Path = DEFAULT_DATA_DIR
    db_url: str | None = None

    # the DICOM listener
    ae_title: AETitle = DEFAULT_AE_TITLE
    host: str = "0.0.0.0"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    allowed_calling_aets: list[str] = Field(default_factory=list)
    max_pdu: int = Field(default=131072, ge=0)
    max_associations: int = Field(default=16, ge=1, le=1000)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=120.0, gt=0)
    shutdown_grace: float = Field(default=30.0, ge=0)
    # several receiver processes on this host share the DICOM port (SO_REUSEPORT; PostgreSQL only): each is a
    # `fracwatch serve` of its own, the kernel spreads the associations across them
    reuse_port: bool = False

    # the study lifecycle
    stable_after: float = Field(default=30.0, gt=0)
    completion_interval: float = Field(default=5.0, gt=0)

    # results (used by scoring and delivery)
    destinations: list[Annotated[Destination, BeforeValidator(_parse_destination)]] = Field(default_factory=list)
    model: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(default=None, ge=1, le=256)
    # where the network runs (model.runtimes): auto = the fastest here of torch and the runtimes the bundle's card
    # records as having passed their gate (timed when a scoring process starts); or one by name
    runtime: Literal["auto", "torch", "torch-bf16", "onnx", "onnx-int8"] = "auto"
    batch_size: int = Field(default=16, ge=1, le=1024)
    # the most study versions a scoring process takes together (those that waited while every process was busy;
    # a study finding a process free goes alone, at once): their images and tiles share the network's batches.
    # Unset: 8 on a GPU, 1 on a CPU (there a batch costs its first study the whole batch's time and gains
    # nothing: bench/batching.py)
    max_batch_studies: int | None = Field(default=None, ge=1, le=1000)

    def batch_studies(self, device_type: str) -> int:
        """``max_batch_studies``, or its default for a scoring device of ``device_type`` ("cuda", "cpu")."""
        if self.max_batch_studies is not None:
            return self.max_batch_studies
        return GPU_BATCH_STUDIES if device_type == "cuda" else 1

    # the job queue (Procrastinate): scoring processes on this host (0 = receive only), and each scoring job's
    # limits: wall-clock time, attempts before the dead letter, the back-off base (waits of b, b², b³ … seconds),
    # and each scoring process's address-space limit
    workers: int = Field(default=1, ge=0, le=64)
    job_timeout: float = Field(default=300.0, gt=0)
    job_attempts: int = Field(default=3, ge=1, le=100)
    job_retry_wait: int = Field(default=5, ge=1, le=600)
    worker_memory_mb: int | None = Field(default=8192, ge=512)
    # a process that sent no heartbeat for this long is taken for dead and its jobs are run elsewhere
    job_stalled_after: float = Field(default=30.0, ge=3)

    # a heat-map Secondary Capture per scored image and a KOS of flagged images, besides the SR
    overlays: bool = False

    # the outbox
    delivery_interval: float = Field(default=10.0, gt=0)
    retry_base: float = Field(default=10.0, gt=0)
    retry_max_delay: float = Field(default=3600.0, gt=0)
    max_attempts: int = Field(default=12, ge=1, le=1000)
    send_timeout: float = Field(default=30.0, gt=0)

    # DICOM TLS (optional): the listener uses TLS when tls_cert and tls_key are set; with tls_ca it also
    # requires client certificates signed by that CA. Destinations use TLS when destination_tls is true.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    destination_tls: bool = False
    destination_ca: Path | None = None

    # the HTTP side: admin API, dashboard, /metrics, /healthz, /readyz
    http_enabled: bool = True
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=1, le=65535)
    http_cookie_secure: bool = False  # set when a TLS reverse proxy fronts the dashboard
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)

    # worklist triage messages for flagged studies
    triage_categories: list[Literal["positive", "doubt"]] = Field(default_factory=lambda: ["positive"])  # type: ignore[arg-type]
    triage_hl7: list[Annotated[HL7Endpoint, BeforeValidator(_parse_hl7)]] = Field(default_factory=list)
    triage_webhooks: list[Annotated[str, BeforeValidator(_check_url)]] = Field(default_factory=list)
    webhook_token: SecretStr | None = None  # sent as "Authorization: Bearer ..."; set it in the environment
    hl7_sending_application: str = Field(default="FRACWATCH", min_length=1, max_length=180)
    hl7_sending_facility: str = Field(default="RADIOLOGY", min_length=1, max_length=180)
    hl7_receiving_application: str = Field(default="RIS", min_length=1, max_length=180)
    hl7_receiving_facility: str = Field(default="RADIOLOGY", min_length=1, max_length=180)
    triage_interval: float = Field(default=10.0, gt=0)

    # retention: spool files (received images and produced objects) older than this are deleted; rows stay
    retention_days: float | None = Field(default=None, gt=0)
    retention_interval: float = Field(default=3600.0, gt=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("allowed_calling_aets")
    @classmethod
    def _allowed_entries(cls, values: list[str]) -> list[str]:
        out = []
        for value in values:
            title, at, source = value.partition("@")
            title = validate_ae_title(title)
            if at:
                try:
                    source = str(ipaddress.ip_address(source.strip()))
                except ValueError:
                    raise ValueError(f"{value!r}: {source!r} is not an IP address") from None
                out.append(f"{title}@{source}")
            else:
                out.append(title)
        return out

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        return self

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Absolute once, here: the spool, the results and the paths the database stores relative to it
        # (store.models.DataPath) all agree whatever the working directory is later.
        return Path(os.path.abspath(value.expanduser()))

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def spool_dir(self) -> Path:
        """Where received instances are written."""
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        """Where the objects fracwatch produces (SRs) are written before they are sent."""
        return self.data_dir / "results"

    @property
    def model_path(self) -> Path:
        """The model bundle: ``model`` if set, else the bundle shipped with fracwatch."""
        return self.model if self.model is not None else default_model_path()

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL: ``db_url`` if set, else a SQLite file in the data directory."""
        if self.db_url:
            return self.db_url
        return f"sqlite:///{self.own_database}"

    @property
    def own_database(self) -> Path:
        """The data directory's own SQLite file: the embedded default, the one database a daemon may create."""
        return (self.data_dir / DB_FILENAME).resolve()


DEFAULT_MODEL = "fracwatch-drr"


def default_model_path() -> Path:
    """The bundle shipped in ``models/`` (packaged as ``fracwatch._models`` in the wheel)."""
    spec = importlib.util.find_spec("fracwatch._models")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL
    return Path(__file__).resolve().parents[1] / "models" / DEFAULT_MODEL


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "settings"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown setting"
        parts.append(f"invalid setting '{key}': {message}")
    return "; ".join(parts)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from the optional TOML file, the environment and explicit overrides.

    ``config_file`` defaults to ``$FRACWATCH_CONFIG``. Overrides whose value is ``None`` are ignored so
    that unset CLI flags fall through to the environment and file. Raises :class:`ConfigError`.
    """
    _check_environment()
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    if config_file is not None:
        _check_toml(config_file)
    explicit = {k: v for k, v in overrides.items() if v is not None and v != ()}
    toml_file = config_file

    class _Settings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if toml_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
            return tuple(sources)

    try:
        return _Settings(**explicit)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except ValueError as exc:  # an environment value that is not valid JSON for a list setting
        raise ConfigError(f"invalid setting: {exc}") from None


def _check_environment() -> None:
    """An unknown ``FRACWATCH_*`` variable stops fracwatch, as an unknown key in the file does (a typo would
    otherwise be ignored silently)."""
    known = {CONFIG_ENV} | {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for name in sorted(os.environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"invalid setting '{name}' in the environment: unknown setting{hint}")


def _check_toml(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"invalid setting 'config': file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"invalid setting 'config': cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid setting 'config': {path} is not valid TOML: {exc}") from None
