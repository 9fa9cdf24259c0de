"""The worklist: flagged studies, positive before doubt, the longest waiting first."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from fracwatch.store import search
from fracwatch.web.context import Ctx
from fracwatch.web.pages.common import User, page

router = APIRouter(include_in_schema=False)


@router.get("/worklist", response_class=HTMLResponse)
def worklist_page(request: Request, ctx: Ctx, principal: User) -> HTMLResponse:
    ctx.audit(request, principal, "worklist", None)
    with ctx.read() as session:
        rows = search.worklist(session)
    return page(request, "worklist.html", principal, rows=rows)
