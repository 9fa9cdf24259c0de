"""The web dashboard: server-rendered Jinja2 pages, signed in with an API token held in an HttpOnly cookie."""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from threading import Lock
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from PIL import Image

from fracwatch.store import access, outbox, search
from fracwatch.store.access import Principal
from fracwatch.store.outbox import list_deliveries
from fracwatch.web import charts
from fracwatch.web.api import StudyFilters
from fracwatch.web.context import COOKIE, WebContext, parse_bound

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
PAGE_SIZE = 50
THUMBNAIL_PX = 384


class _SignIn(Exception):
    """The dashboard needs a (valid) sign-in."""


class _CamCache:
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


def build_router(ctx: WebContext) -> APIRouter:
    """The dashboard's pages bound to ``ctx``."""
    router = APIRouter(include_in_schema=False)
    cams = _CamCache()

    def user(request: Request, role: str = "viewer") -> Principal:
        principal = ctx.principal(request.cookies.get(COOKIE))
        if principal is None:
            raise _SignIn()
        if not principal.may(role):
            raise HTTPException(403, f"the {role} role is required")
        return principal

    def page(request: Request, name: str, principal: Principal | None, **values: Any) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, name, {"user": principal, **values})

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, error: str | None = None) -> HTMLResponse:
        return page(request, "login.html", None, error=error)

    @router.post("/login")
    def login(request: Request, token: Annotated[str, Form()]) -> Response:
        principal = ctx.principal(token.strip())
        if principal is None:
            return page(request, "login.html", None, error="That token is not valid (or was revoked).")
        ctx.audit(request, principal, "dashboard.sign_in", None)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE,
            token.strip(),
            httponly=True,
            samesite="strict",
            secure=ctx.settings.http_cookie_secure,
            max_age=12 * 3600,
        )
        return response

    @router.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @router.get("/", response_class=HTMLResponse)
    def studies_page(request: Request, page_no: int = 1) -> HTMLResponse:
        principal = user(request)
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

    @router.get("/worklist", response_class=HTMLResponse)
    def worklist_page(request: Request) -> HTMLResponse:
        principal = user(request)
        ctx.audit(request, principal, "worklist", None)
        with ctx.read() as session:
            rows = search.worklist(session)
        return page(request, "worklist.html", principal, rows=rows)

    @router.get("/studies/{study_uid}", response_class=HTMLResponse)
    def study_page(request: Request, study_uid: str) -> HTMLResponse:
        principal = user(request)
        ctx.audit(request, principal, "study.view", study_uid)
        with ctx.read() as session:
            detail = search.study_detail(session, study_uid)
            if detail is None:
                raise HTTPException(404, f"no study {study_uid}")
            feedback = access.study_feedback(session, [detail.study_id])
        return page(request, "study.html", principal, detail=detail, feedback=feedback)

    @router.post("/studies/{study_uid}/feedback")
    def feedback_form(
        request: Request, study_uid: str, verdict: Annotated[str, Form()], note: Annotated[str, Form()] = ""
    ) -> Response:
        principal = user(request)
        if verdict not in access.VERDICTS:
            raise HTTPException(422, "verdict must be agree, disagree or note")
        with ctx.write() as session:
            saved = access.add_feedback(session, study_uid, verdict, note.strip() or None, principal.name, ctx.clock())
        if saved is None:
            raise HTTPException(404, f"no scored study {study_uid}")
        ctx.audit(request, principal, "study.feedback", study_uid)
        return RedirectResponse(f"/studies/{study_uid}", status_code=303)

    @router.get("/studies/{study_uid}/cam/{sop_uid}.png")
    def cam_thumbnail(request: Request, study_uid: str, sop_uid: str) -> Response:
        principal = user(request)
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

    @router.get("/stats", response_class=HTMLResponse)
    def stats_page(request: Request, since: str | None = None, until: str | None = None) -> HTMLResponse:
        principal = user(request)
        ctx.audit(request, principal, "stats", f"since={since}&until={until}")
        with ctx.read() as session:
            stats = search.statistics(session, parse_bound(since, "since"), parse_bound(until, "until"))
        labels = [d.day.isoformat() for d in stats.days]
        pictures = {
            "volume": charts.stacked_bars("Studies scored per day", labels, [d.counts for d in stats.days]),
            "rate": charts.lines(
                "Positive rate per day",
                labels,
                [charts.Series("positive rate", "#c0392b", [d.positive_rate for d in stats.days])],
            ),
            "turnaround": charts.lines(
                "Turnaround per day (seconds)",
                labels,
                [
                    charts.Series("p50", "#2e86c1", [d.turnaround_p50 for d in stats.days]),
                    charts.Series("p95", "#8e44ad", [d.turnaround_p95 for d in stats.days]),
                ],
                unit=" s",
            ),
        }
        return page(request, "stats.html", principal, stats=stats, charts=pictures, since=since, until=until)

    @router.get("/outbox", response_class=HTMLResponse)
    def outbox_page(request: Request) -> HTMLResponse:
        principal = user(request, "admin")
        ctx.audit(request, principal, "outbox.list", None)
        with ctx.read() as session:
            deliveries = list_deliveries(session, ["pending", "dead"])
            messages = outbox.list_messages(session, ["pending", "dead"])
        return page(request, "outbox.html", principal, deliveries=deliveries, messages=messages)

    @router.get("/upload", response_class=HTMLResponse)
    def upload_form(request: Request) -> HTMLResponse:
        return page(request, "upload.html", user(request), result=None, error=None)

    @router.post("/upload", response_class=HTMLResponse)
    async def upload(request: Request, file: UploadFile) -> HTMLResponse:
        principal = user(request)
        if ctx.scorer is None:
            return page(request, "upload.html", principal, result=None, error="No model is loaded.")
        data = await file.read(ctx.settings.max_upload_bytes + 1)
        if not data:
            return page(request, "upload.html", principal, result=None, error="Choose a PNG, JPEG or DICOM file.")
        if len(data) > ctx.settings.max_upload_bytes:
            return page(request, "upload.html", principal, result=None, error="The file is too large.")
        ctx.audit(request, principal, "predict.upload", file.filename)
        result = ctx.scorer.score_bytes(data, file.filename or "upload")
        return page(request, "upload.html", principal, result=result, error=result.error)

    return router


def sign_in_redirect(request: Request, _exc: Exception) -> Response:
    """Send a browser without a valid cookie to the sign-in page."""
    if request.cookies.get(COOKIE):  # a cookie whose token is no longer valid (revoked)
        response = RedirectResponse("/login?error=expired", status_code=303)
        response.delete_cookie(COOKIE)
        return response
    return RedirectResponse("/login", status_code=303)


def _thumbnail(png: bytes) -> bytes:
    picture = Image.open(io.BytesIO(png))
    picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()
