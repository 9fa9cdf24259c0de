"""The FastAPI application and the uvicorn server thread ``fracwatch serve`` runs it in."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from fracwatch import __version__
from fracwatch.errors import FracwatchError
from fracwatch.web import api, health, security
from fracwatch.web.context import WebContext
from fracwatch.web.pages import auth, outbox, stats, studies, upload, worklist
from fracwatch.web.pages.common import SignInNeeded, sign_in_redirect

LOGGER = logging.getLogger(__name__)

ROUTERS = (
    health.router,
    api.router,
    auth.router,
    studies.router,
    worklist.router,
    stats.router,
    outbox.router,
    upload.router,
)


def create_app(ctx: WebContext) -> FastAPI:
    """The whole HTTP surface: /api, the dashboard, /metrics, /healthz, /readyz; OpenAPI at /docs."""
    app = FastAPIOffline(  # FastAPI, with /docs served from Swagger UI's packaged assets (no CDN)
        title="fracwatch",
        version=__version__,
        description="Admin API of the fracwatch fracture-triage daemon. Send `Authorization: Bearer <token>` "
        "(create one with `fracwatch token create`).",
        redoc_url=None,
        static_url=security.DOCS_ASSETS,
    )
    app.state.ctx = ctx
    app.state.cam_cache = studies.CamCache()
    for router in ROUTERS:
        app.include_router(router)
    app.add_exception_handler(SignInNeeded, sign_in_redirect)

    @app.middleware("http")
    async def refuse_nul(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # No text fracwatch stores or matches holds a NUL, and PostgreSQL refuses one in any string (a 500):
        # the request is refused here, naming the parameter.
        where = nul_parameter(request)
        if where is not None:
            return JSONResponse(
                {
                    "detail": [
                        {
                            "loc": list(where),
                            "msg": f"{where[1]} must not contain a NUL character",
                            "type": "value_error",
                        }
                    ]
                },
                status_code=422,
            )
        return await call_next(request)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        ctx.metrics.http_requests.labels(path, f"{response.status_code // 100}xx").inc()
        return response

    @app.middleware("http")  # added last: the outermost, so every answer gets the headers
    async def browser_protections(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if security.cross_site(request):
            LOGGER.warning("refused a cross-site %s %s", request.method, request.url.path)
            response: Response = JSONResponse({"detail": "cross-site request refused"}, status_code=403)
        else:
            response = await call_next(request)
        for name, value in security.security_headers(request.url.path, response.headers.get("content-type")).items():
            response.headers.setdefault(name, value)
        return response

    return app


def nul_parameter(request: Request) -> tuple[str, str] | None:
    """("path", "path") or ("query", NAME) where the request carries a NUL character, else None."""
    if "\x00" in request.url.path:  # the path as routed: percent-decoded
        return ("path", "path")
    for name, value in request.query_params.multi_items():
        if "\x00" in name or "\x00" in value:
            return ("query", name.replace("\x00", ""))
    return None


class HttpServer:
    """uvicorn serving the app on a thread of its own; ``stop`` lets in-flight requests finish."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        # log_config=None: uvicorn logs through fracwatch's handlers (UTC timestamps, no PHI).
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off", log_config=None
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fracwatch-http", daemon=True)
        self.host, self.port = host, port

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; raise FracwatchError when the port cannot be bound."""
        # uvicorn logs a failed bind at ERROR before giving up; we report it in one line instead
        uvicorn_errors = logging.getLogger("uvicorn.error")
        level = uvicorn_errors.level
        uvicorn_errors.setLevel(logging.CRITICAL)
        try:
            self._wait_started(timeout)
        finally:
            uvicorn_errors.setLevel(level)
        LOGGER.info("HTTP API and dashboard on http://%s:%d", self.host, self.port)

    def _wait_started(self, timeout: float) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)  # uvicorn offers no start-up event to wait on
        if not self._server.started:
            self._server.should_exit = True
            raise FracwatchError(f"cannot serve HTTP on {self.host}:{self.port} (port in use or not permitted)")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, finish in-flight requests, join the thread (nothing to do if never started)."""
        self._server.should_exit = True
        if self._thread.ident is not None:
            self._thread.join(timeout=timeout)
