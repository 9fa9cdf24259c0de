"""What the HTTP side needs from the daemon, and the per-request helpers: authentication, audit, sessions."""

from __future__ import annotations

import base64
import io
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from fracwatch.config import Settings
from fracwatch.model.bundle import Bundle
from fracwatch.model.predictor import Predictor
from fracwatch.service.lifecycle import Clock, utc_now
from fracwatch.service.metrics import Metrics
from fracwatch.service.scoring import LoadedImage, cam_pictures, load_file, score_loaded
from fracwatch.store.access import Principal, authenticate, record_audit

COOKIE = "fracwatch_token"


@dataclass(frozen=True)
class UploadResult:
    """What the upload page and ``POST /api/predict`` answer."""

    filename: str
    probability: float | None
    category: str
    error: str | None
    model: str
    model_version: str
    cam_png: bytes | None = field(default=None, repr=False)

    @property
    def cam_data_uri(self) -> str | None:
        if self.cam_png is None:
            return None
        return "data:image/png;base64," + base64.b64encode(self.cam_png).decode("ascii")


class ImageScorer:
    """Scores one image with Grad-CAM for the web pages: its own copy of the network, one request at a time."""

    def __init__(self, bundle: Bundle, device: str = "cpu") -> None:
        self.bundle = bundle
        self._predictor = Predictor(bundle.network, device)
        self._lock = threading.Lock()

    def score_path(self, path: Path, name: str) -> UploadResult:
        """Probability, category and Grad-CAM picture of a PNG/JPEG/DICOM file."""
        with self._lock:
            image: LoadedImage = load_file(path, self.bundle.preprocess_config)
            probability = score_loaded([image], self._predictor, self.bundle.preprocess_config)[0]
            picture = cam_pictures([image], [probability], self._predictor, self.bundle)[0]
        png = None
        if picture is not None:
            buffer = io.BytesIO()
            Image.fromarray(picture).save(buffer, format="PNG")
            png = buffer.getvalue()
        card = self.bundle.card
        category = self.bundle.category(probability) if probability is not None else "error"
        return UploadResult(name, probability, category, image.error, card.name, card.version, png)

    def score_bytes(self, data: bytes, name: str) -> UploadResult:
        """As :meth:`score_path` for an upload (kept in a temporary file only while it is scored)."""
        suffix = Path(name).suffix.lower() if Path(name).suffix.lower() in (".png", ".jpg", ".jpeg") else ".dcm"
        with tempfile.TemporaryDirectory(prefix="fracwatch-upload-") as folder:
            path = Path(folder) / f"upload{suffix}"
            path.write_bytes(data)
            return self.score_path(path, name)


@dataclass
class WebContext:
    """The daemon's parts the HTTP side uses."""

    sessions: sessionmaker[Any]
    settings: Settings
    metrics: Metrics
    ready: Callable[[], tuple[bool, dict[str, bool]]]
    scorer: ImageScorer | None = None
    clock: Clock = utc_now

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for one request's reads."""
        with self.sessions() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose transaction commits when the block ends."""
        with self.sessions() as session, session.begin():
            yield session

    def principal(self, token: str | None) -> Principal | None:
        """Who holds ``token`` (and note its use), or None."""
        if not token:
            return None
        with self.write() as session:
            return authenticate(session, token, self.clock())

    def audit(self, request: Request, principal: Principal, action: str, target: str | None) -> None:
        """Write one audit row for this request."""
        client = request.client.host if request.client else None
        with self.write() as session:
            record_audit(session, principal, action, target, client, self.clock())


def request_token(request: Request) -> str | None:
    """The bearer token of an API call, else the dashboard's cookie."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(COOKIE)


def api_principal(ctx: WebContext, request: Request, role: str) -> Principal:
    """The caller, or HTTP 401 (no/unknown token) / 403 (role too low)."""
    principal = ctx.principal(request_token(request))
    if principal is None:
        raise HTTPException(401, "a valid API token is required", headers={"WWW-Authenticate": "Bearer"})
    if not principal.may(role):
        raise HTTPException(403, f"the {role} role is required")
    return principal


def context_of(request: Request) -> WebContext:
    """The context ``create_app`` stored on the application."""
    ctx: WebContext = request.app.state.ctx
    return ctx


def require_viewer(request: Request) -> Principal:
    """Dependency: a viewer (or admin) token, else 401/403."""
    return api_principal(context_of(request), request, "viewer")


def require_admin(request: Request) -> Principal:
    """Dependency: an admin token, else 401/403."""
    return api_principal(context_of(request), request, "admin")


Viewer = Annotated[Principal, Depends(require_viewer)]
Admin = Annotated[Principal, Depends(require_admin)]


def parse_bound(value: str | None, name: str) -> datetime | None:
    """A query's date bound as an aware UTC datetime: ISO 8601 date (its midnight, UTC) or date-time.

    Raises HTTP 422 naming the parameter.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time.min, tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise HTTPException(422, f"{name} must be an ISO 8601 date or date-time, not {value!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
