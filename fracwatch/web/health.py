"""Liveness, readiness and the Prometheus metrics: no token needed (bind the HTTP side to a trusted network)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fracwatch import __version__
from fracwatch.web.context import Ctx

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok", "version": __version__}


@router.get("/readyz")
def readyz(ctx: Ctx) -> JSONResponse:
    """Database reachable, listener accepting, worker running: 200, else 503."""
    ok, checks = ctx.ready()
    return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics")
def metrics(ctx: Ctx) -> Response:
    """Prometheus exposition of every fracwatch_* metric."""
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
