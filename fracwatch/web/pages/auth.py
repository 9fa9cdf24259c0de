"""Signing in and out of the dashboard."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fracwatch.store.access import close_session, open_session
from fracwatch.web.context import COOKIE, Ctx
from fracwatch.web.pages.common import page

router = APIRouter(include_in_schema=False)

SESSION_SECONDS = 12 * 3600


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, error: str | None = None) -> HTMLResponse:
    return page(request, "login.html", None, error=error)


@router.post("/login")
def login(request: Request, ctx: Ctx, token: Annotated[str, Form()]) -> Response:
    principal = ctx.principal(token.strip())
    if principal is None:
        ctx.audit_refused(request, "dashboard.sign_in_refused")
        return page(request, "login.html", None, error="That token is not valid (or was revoked).")
    ctx.audit(request, principal, "dashboard.sign_in", None)
    with ctx.write() as session:
        key = open_session(session, principal, ctx.clock(), timedelta(seconds=SESSION_SECONDS))
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        COOKIE,
        key,
        httponly=True,
        samesite="strict",
        secure=ctx.settings.http_cookie_secure,
        max_age=SESSION_SECONDS,
    )
    return response


@router.post("/logout")
def logout(request: Request, ctx: Ctx) -> Response:
    key = request.cookies.get(COOKIE)
    if key:
        with ctx.write() as session:
            close_session(session, key)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response
