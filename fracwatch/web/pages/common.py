"""What every dashboard page shares: templates, the signed-in user as a dependency, the sign-in redirect."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from fracwatch.store.access import Principal
from fracwatch.web.context import COOKIE, Ctx

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parents[1] / "templates"))


class SignInNeeded(Exception):
    """The dashboard needs a (valid) sign-in."""


def _signed_in(request: Request, ctx: Ctx, role: str) -> Principal:
    principal = ctx.session_principal(request.cookies.get(COOKIE))
    if principal is None:
        raise SignInNeeded()
    if not principal.may(role):
        raise HTTPException(403, f"the {role} role is required")
    return principal


def signed_in_viewer(request: Request, ctx: Ctx) -> Principal:
    """Dependency: the signed-in user (viewer or admin), else a redirect to the sign-in page."""
    return _signed_in(request, ctx, "viewer")


def signed_in_admin(request: Request, ctx: Ctx) -> Principal:
    """Dependency: a signed-in admin, else a redirect to the sign-in page (or 403 for a viewer)."""
    return _signed_in(request, ctx, "admin")


User = Annotated[Principal, Depends(signed_in_viewer)]
AdminUser = Annotated[Principal, Depends(signed_in_admin)]


def page(request: Request, name: str, principal: Principal | None, **values: Any) -> HTMLResponse:
    """Render a template with the signed-in user."""
    return TEMPLATES.TemplateResponse(request, name, {"user": principal, **values})


def sign_in_redirect(request: Request, _exc: Exception) -> Response:
    """Send a browser without a valid cookie to the sign-in page."""
    if request.cookies.get(COOKIE):  # a session that ended (expired, or its token revoked)
        response = RedirectResponse("/login?error=expired", status_code=303)
        response.delete_cookie(COOKIE)
        return response
    return RedirectResponse("/login", status_code=303)
