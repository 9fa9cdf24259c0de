"""The admin API under /api: study search, a study's record, stats, CSV export, worklist, feedback, audit.

Every route needs a token (viewer or admin) and every read of study data writes an audit row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from fracwatch.store import access, search
from fracwatch.store import outbox as outbox_store
from fracwatch.store.search import StudyRow
from fracwatch.web.context import MAX_OFFSET, Admin, Ctx, Viewer, parse_bound
from fracwatch.web.filters import StudyFilters

EXPORT_LIMIT = 100_000
NO_NUL = r"^[^\x00]*$"  # PostgreSQL stores no NUL in text
CSV_FIELDS = [f.name for f in dataclasses.fields(StudyRow)]


class FeedbackIn(BaseModel):
    """A radiologist's verdict on the study's latest result."""

    verdict: Literal["agree", "disagree", "note"]
    note: str | None = Field(None, max_length=4000, pattern=NO_NUL)


router = APIRouter(prefix="/api", tags=["api"])


@router.get("/studies", summary="Search studies (each with its latest result)")
def list_studies(
    request: Request,
    ctx: Ctx,
    principal: Viewer,
    filters: Annotated[StudyFilters, Query()],
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> dict[str, Any]:
    query = filters.query(limit, offset)
    ctx.audit(request, principal, "studies.list", filters.describe() or None)
    with ctx.read() as session:
        total, rows = search.search_studies(session, query)
    return {"total": total, "limit": limit, "offset": offset, "items": jsonable_encoder(rows)}


@router.get("/studies/{study_uid}", summary="One study: images, scores, SR/overlay UIDs, deliveries, versions")
def get_study(request: Request, ctx: Ctx, principal: Viewer, study_uid: str) -> dict[str, Any]:
    ctx.audit(request, principal, "study.view", study_uid)
    with ctx.read() as session:
        detail = search.study_detail(session, study_uid)
        if detail is None:
            raise HTTPException(404, f"no study {study_uid}")
        feedback = access.study_feedback(session, [detail.study_id])
    body: dict[str, Any] = jsonable_encoder(detail)
    body.pop("study_id", None)
    body["feedback"] = jsonable_encoder(feedback)
    return body


@router.post("/studies/{study_uid}/feedback", status_code=201, summary="Agree / disagree / note")
def post_feedback(
    request: Request, ctx: Ctx, principal: Viewer, study_uid: str, feedback: FeedbackIn
) -> dict[str, Any]:
    with ctx.write() as session:
        feedback_id = access.add_feedback(
            session, study_uid, feedback.verdict, feedback.note, principal.name, ctx.clock()
        )
    if feedback_id is None:
        raise HTTPException(404, f"no scored study {study_uid}")
    ctx.audit(request, principal, "study.feedback", study_uid)
    return {"id": feedback_id, "study_instance_uid": study_uid, "verdict": feedback.verdict}


@router.get("/stats", summary="Per-day counts, positive rate, turnaround p50/p95, failures, agreement")
def stats(
    request: Request, ctx: Ctx, principal: Viewer, since: str | None = None, until: str | None = None
) -> dict[str, Any]:
    bounds = parse_bound(since, "since"), parse_bound(until, "until")
    ctx.audit(request, principal, "stats", f"since={since}&until={until}")
    with ctx.read() as session:
        return jsonable_encoder(search.statistics(session, *bounds))


@router.get("/export.csv", summary="The filtered study list as CSV")
def export_csv(
    request: Request, ctx: Ctx, principal: Viewer, filters: Annotated[StudyFilters, Query()]
) -> StreamingResponse:
    query = filters.query(EXPORT_LIMIT, 0)
    ctx.audit(request, principal, "export.csv", filters.describe() or None)
    with ctx.read() as session:
        _total, rows = search.search_studies(session, query)
    return StreamingResponse(
        _csv_lines(rows),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="fracwatch-studies.csv"'},
    )


@router.get("/worklist", summary="Flagged studies: positive before doubt, longest waiting first")
def worklist(request: Request, ctx: Ctx, principal: Viewer) -> dict[str, Any]:
    ctx.audit(request, principal, "worklist", None)
    with ctx.read() as session:
        return {"items": jsonable_encoder(search.worklist(session))}


@router.get("/audit", summary="Audit trail (admin)")
def audit(
    request: Request,
    ctx: Ctx,
    principal: Admin,
    since: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> dict[str, Any]:
    with ctx.read() as session:
        total, rows = access.list_audit(session, parse_bound(since, "since"), actor, action, limit, offset)
    ctx.audit(request, principal, "audit.list", None)
    return {"total": total, "limit": limit, "offset": offset, "items": jsonable_encoder(rows)}


@router.get("/outbox", summary="DICOM deliveries and triage messages not yet done, and dead letters (admin)")
def outbox(request: Request, ctx: Ctx, principal: Admin, include_sent: bool = False) -> dict[str, Any]:
    states = ["pending", "dead", "sent"] if include_sent else ["pending", "dead"]
    ctx.audit(request, principal, "outbox.list", None)
    with ctx.read() as session:
        return {
            "deliveries": jsonable_encoder(outbox_store.list_deliveries(session, states)),
            "triage_messages": jsonable_encoder(outbox_store.list_messages(session, states)),
        }


@router.post("/predict", summary="Score an uploaded PNG/JPEG/DICOM image (nothing is stored)")
async def predict(request: Request, ctx: Ctx, principal: Viewer, file: Annotated[UploadFile, File()]) -> dict[str, Any]:
    if ctx.scorer is None:
        raise HTTPException(503, "no model is loaded")
    data = await file.read(ctx.settings.max_upload_bytes + 1)
    if len(data) > ctx.settings.max_upload_bytes:
        raise HTTPException(413, f"uploads are limited to {ctx.settings.max_upload_bytes} bytes")
    ctx.audit(request, principal, "predict.upload", file.filename)
    # scored on a worker thread: the event loop (every other request, /healthz) goes on meanwhile
    result = await run_in_threadpool(ctx.scorer.score_bytes, data, file.filename or "upload")
    if result.error is not None:
        raise HTTPException(422, result.error)
    return {
        "file": result.filename,
        "probability": result.probability,
        "category": result.category,
        "reason": result.reason,
        "model": result.model,
        "model_version": result.model_version,
        "cam_png": result.cam_data_uri,
    }


def _csv_lines(rows: list[StudyRow]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in dataclasses.asdict(row).items()})
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _cell(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value  # keep spreadsheets from evaluating a received header value as a formula
    return value
