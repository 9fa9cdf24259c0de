"""What the HTTP side needs from the daemon, and the per-request helpers: authentication, audit, sessions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from fracwatch.config import Settings
from fracwatch.domain import parse_time_bound
from fracwatch.service.lifecycle import Clock, utc_now
from fracwatch.service.metrics import Metrics
from fracwatch.service.upload import ImageScorer
from fracwatch.store.access import Principal, authenticate, record_audit, session_principal

COOKIE = "fracwatch_session"  # a dashboard session key (store.access.open_session), not the API token
MAX_OFFSET = 1_000_000_000  # paging offsets above this are refused (422), far past any real result count


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

    def session_principal(self, key: str | None) -> Principal | None:
        """Who a dashboard cookie's session belongs to, or None."""
        if not key:
            return None
        with self.write() as session:
            return session_principal(session, key, self.clock())

    def audit_refused(self, request: Request, action: str) -> None:
        """Write an audit row for a presented token that was refused (unknown, revoked): who tried, from where."""
        self.audit(request, Principal(0, "(invalid token)", "none"), action, None)

    def audit(self, request: Request, principal: Principal, action: str, target: str | None) -> None:
        """Write one audit row for this request."""
        client = request.client.host if request.client else None
        with self.write() as session:
            record_audit(session, principal, action, target, client, self.clock())


def bearer_token(request: Request) -> str | None:
    """The bearer token of an API call, if it has one."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def api_principal(ctx: WebContext, request: Request, role: str) -> Principal:
    """The caller — a bearer token, else the dashboard's session cookie — or HTTP 401 (none, or unknown; an
    unknown token is audited) / 403 (role too low)."""
    token = bearer_token(request)
    principal = ctx.principal(token) if token else ctx.session_principal(request.cookies.get(COOKIE))
    if principal is None:
        if token:
            ctx.audit_refused(request, "api.token_refused")
        raise HTTPException(401, "a valid API token is required", headers={"WWW-Authenticate": "Bearer"})
    if not principal.may(role):
        raise HTTPException(403, f"the {role} role is required")
    return principal


def context_of(request: Request) -> WebContext:
    """The context ``create_app`` stored on the application."""
    ctx: WebContext = request.app.state.ctx
    return ctx


Ctx = Annotated[WebContext, Depends(context_of)]


# Declares the scheme in the OpenAPI document (the token itself is read by ``api_principal``, which also takes
# the dashboard's cookie).
BEARER = HTTPBearer(auto_error=False, description="An API token from `fracwatch token create`")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


def require_viewer(request: Request, ctx: Ctx, _bearer: Bearer) -> Principal:
    """Dependency: a viewer (or admin) token, else 401/403."""
    return api_principal(ctx, request, "viewer")


def require_admin(request: Request, ctx: Ctx, _bearer: Bearer) -> Principal:
    """Dependency: an admin token, else 401/403."""
    return api_principal(ctx, request, "admin")


Viewer = Annotated[Principal, Depends(require_viewer)]
Admin = Annotated[Principal, Depends(require_admin)]


def parse_bound(value: str | None, name: str) -> datetime | None:
    """A query's date bound (see :func:`fracwatch.domain.parse_time_bound`); HTTP 422 naming the parameter."""
    if value is None or not value.strip():
        return None
    try:
        return parse_time_bound(value)
    except ValueError:
        raise HTTPException(422, f"{name} must be an ISO 8601 date or date-time, not {value!r}") from None
