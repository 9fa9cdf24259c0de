"""Browser-facing protections: security headers on every response and a same-origin rule for state changes.

A state-changing request (POST, PUT, PATCH, DELETE) authenticated by the dashboard's cookie — or signing in —
must come from one of fracwatch's own pages: its ``Origin`` (else ``Referer``) must be this server's origin, or
the browser must say ``Sec-Fetch-Site: same-origin``. A request carrying ``Authorization: Bearer`` is an API
client, not a browser riding a cookie, and is not checked. Without this a page on any other site could post the
feedback form, or sign a victim in under the attacker's token (login CSRF).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import Request

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DOCS_ASSETS = "/static/swagger"  # Swagger UI's scripts and styles (fastapi-offline)
DOCS_PATHS = ("/docs", "/openapi.json", f"{DOCS_ASSETS}/")

# The dashboard's pages load nothing from elsewhere: their style is inline, their charts inline SVG, their
# Grad-CAM pictures data: URIs or our own PNGs; they run no script.
PAGE_POLICY = (
    "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def _origin(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def cross_site(request: Request) -> bool:
    """True for a state-changing, cookie-borne request that did not come from this server's own pages."""
    if request.method in SAFE_METHODS:
        return False
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return False
    own = f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}".lower()
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        return _origin(origin) != own
    referer = request.headers.get("referer")
    if referer:
        return _origin(referer) != own
    return request.headers.get("sec-fetch-site") != "same-origin"


def security_headers(path: str, content_type: str | None) -> dict[str, str]:
    """The headers a response to ``path`` gets (on top of what the route set)."""
    headers = dict(COMMON_HEADERS)
    if path.startswith(DOCS_PATHS):
        return headers  # Swagger UI needs its own scripts; nothing else is served there
    if content_type and content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = PAGE_POLICY
    if path.startswith("/api/"):
        headers["Cache-Control"] = "no-store"  # study data: no shared or browser cache keeps it
    return headers
