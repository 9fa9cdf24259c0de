"""The study list, one study's page, its feedback form and its Grad-CAM thumbnails."""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from threading import Lock
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from PIL import Image

from fracwatch.store import access, search
from fracwatch.web.context import MAX_OFFSET, Ctx
from fracwatch.web.filters import StudyFilters
from fracwatch.web.pages.common import User, page

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 50
MAX_PAGE = MAX_OFFSET // PAGE_SIZE
THUMBNAIL_PX = 384


class CamCache:
    """Grad-CAM thumbnails of recently viewed images (PNG bytes), least recently used dropped first."""

    def __init__(self, size: int = 64) -> None:
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = size
        self._lock = Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)


def cam_cache(request: Request) -> CamCache:
    """The application's thumbnail cache (``create_app`` makes one per application)."""
    cache: CamCache = request.app.state.cam_cache
    return cache


Cams = Annotated[CamCache, Depends(cam_cache)]


@router.get("/", response_class=HTMLResponse)
def studies_page(
    request: Request, ctx: Ctx, principal: User, page_no: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1
) -> HTMLResponse:
    raw = {k: v for k, v in request.query_params.items() if k in StudyFilters.model_fields and v != ""}
    try:
        filters = StudyFilters.model_validate(raw)
    except ValueError:
        filters = StudyFilters.model_validate({})
    page_no = max(1, page_no)
    query = filters.query(PAGE_SIZE, (page_no - 1) * PAGE_SIZE)
    ctx.audit(request, principal, "studies.list", filters.describe() or None)
    with ctx.read() as session:
        total, rows = search.search_studies(session, query)
    pages = max(1, -(-total // PAGE_SIZE))
    return page(
        request,
        "studies.html",
        principal,
        rows=rows,
        total=total,
        filters=filters,
        raw=raw,
        page_no=page_no,
        pages=pages,
    )


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(request: Request, ctx: Ctx, principal: User, study_uid: str) -> HTMLResponse:
    ctx.audit(request, principal, "study.view", study_uid)
    with ctx.read() as session:
        detail = search.study_detail(session, study_uid)
        if detail is None:
            raise HTTPException(404, f"no study {study_uid}")
        feedback = access.study_feedback(session, [detail.study_id])
    return page(request, "study.html", principal, detail=detail, feedback=feedback)


@router.post("/studies/{study_uid}/feedback")
def feedback_form(
    request: Request,
    ctx: Ctx,
    principal: User,
    study_uid: str,
    verdict: Annotated[str, Form()],
    note: Annotated[str, Form()] = "",
) -> Response:
    if verdict not in access.VERDICTS:
        raise HTTPException(422, "verdict must be agree, disagree or note")
    if "\x00" in note:
        raise HTTPException(422, "note must not contain a NUL character")
    with ctx.write() as session:
        saved = access.add_feedback(session, study_uid, verdict, note.strip() or None, principal.name, ctx.clock())
    if saved is None:
        raise HTTPException(404, f"no scored study {study_uid}")
    ctx.audit(request, principal, "study.feedback", study_uid)
    return RedirectResponse(f"/studies/{study_uid}", status_code=303)


@router.get("/studies/{study_uid}/cam/{sop_uid}.png")
def cam_thumbnail(request: Request, ctx: Ctx, principal: User, cams: Cams, study_uid: str, sop_uid: str) -> Response:
    if ctx.scorer is None:
        raise HTTPException(503, "no model is loaded")
    key = f"{study_uid}/{sop_uid}"
    png = cams.get(key)
    if png is None:
        with ctx.read() as session:
            path = search.instance_path(session, study_uid, sop_uid)
        if path is None or not Path(path).is_file():
            raise HTTPException(404, "the image is not held (unknown, or purged by retention)")
        result = ctx.scorer.score_path(Path(path), sop_uid)
        if result.cam_png is None:
            raise HTTPException(422, result.error or "the image could not be scored")
        png = _thumbnail(result.cam_png)
        cams.put(key, png)
    ctx.audit(request, principal, "image.cam", f"{study_uid} {sop_uid}")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


def _thumbnail(png: bytes) -> bytes:
    picture = Image.open(io.BytesIO(png))
    picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()
