"""The web dashboard: static HTML + vanilla JS (api/dashboard/), no build step. It calls the same
/v1 API with the key the user types (kept in the browser's localStorage)."""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse, RedirectResponse

from api import routing
from api.errors import not_found

DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "dashboard"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# Scripts and styles only from this origin, no inline code; images from anywhere (presigned URLs
# point at the object store); the page cannot be framed.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: http: https:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = routing.router(include_in_schema=False)


@router.get("/dashboard")
def dashboard() -> FileResponse:
    return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/dashboard/")
def dashboard_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard/{name}")
def dashboard_asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise not_found("dashboard file", name)
    return FileResponse(DASHBOARD_DIR / name, media_type=ASSETS[name], headers=HEADERS)
