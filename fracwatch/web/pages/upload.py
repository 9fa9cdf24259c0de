"""The upload page: score one PNG, JPEG or DICOM file with Grad-CAM; nothing is stored."""

from __future__ import annotations

from fastapi import APIRouter, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from fracwatch.web.context import Ctx
from fracwatch.web.pages.common import User, page

router = APIRouter(include_in_schema=False)


@router.get("/upload", response_class=HTMLResponse)
def upload_form(request: Request, principal: User) -> HTMLResponse:
    return page(request, "upload.html", principal, result=None, error=None)


@router.post("/upload", response_class=HTMLResponse)
async def upload(request: Request, ctx: Ctx, principal: User, file: UploadFile) -> HTMLResponse:
    if ctx.scorer is None:
        return page(request, "upload.html", principal, result=None, error="No model is loaded.")
    data = await file.read(ctx.settings.max_upload_bytes + 1)
    if not data:
        return page(request, "upload.html", principal, result=None, error="Choose a PNG, JPEG or DICOM file.")
    if len(data) > ctx.settings.max_upload_bytes:
        return page(request, "upload.html", principal, result=None, error="The file is too large.")
    ctx.audit(request, principal, "predict.upload", file.filename)
    # scored on a worker thread: the event loop (every other request, /healthz) goes on meanwhile
    result = await run_in_threadpool(ctx.scorer.score_bytes, data, file.filename or "upload")
    return page(request, "upload.html", principal, result=result, error=result.error)
