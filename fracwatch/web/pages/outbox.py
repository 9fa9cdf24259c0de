"""The outbox page (admins): DICOM deliveries and triage messages not yet done, and dead letters."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from fracwatch.store import outbox
from fracwatch.web.context import Ctx
from fracwatch.web.pages.common import AdminUser, page

router = APIRouter(include_in_schema=False)


@router.get("/outbox", response_class=HTMLResponse)
def outbox_page(request: Request, ctx: Ctx, principal: AdminUser) -> HTMLResponse:
    ctx.audit(request, principal, "outbox.list", None)
    with ctx.read() as session:
        deliveries = outbox.list_deliveries(session, ["pending", "dead"])
        messages = outbox.list_messages(session, ["pending", "dead"])
    return page(request, "outbox.html", principal, deliveries=deliveries, messages=messages)
