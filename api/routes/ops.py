"""Operations: liveness, readiness (database, broker, storage), Prometheus metrics."""

from __future__ import annotations

import hmac
import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api import metrics, routing
from api.errors import ApiError
from shared.db import get_engine
from shared.queue import producer
from shared.storage import get_storage

router = routing.router(tags=["operations"])
log = logging.getLogger(__name__)


@router.get("/healthz")
async def healthz() -> dict:  # no I/O: answered on the event loop
    return {"status": "ok"}


def _check_db(settings) -> None:
    with get_engine(settings).connect() as conn:
        conn.execute(text("SELECT 1"))


def _check_broker(settings) -> None:
    with producer(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _check_storage(settings) -> None:
    get_storage(settings).check()


@router.get("/readyz")
def readyz(request: Request):
    settings = request.app.state.settings
    checks = {}
    for name, fn in (("database", _check_db), ("broker", _check_broker), ("storage", _check_storage)):
        try:
            fn(settings)
            checks[name] = "ok"
        except Exception as exc:  # report every dependency, not just the first one down
            log.warning("readiness: %s unreachable: %s", name, exc)
            checks[name] = f"unreachable: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    if ok:
        return {"status": "ready", "checks": checks}
    return JSONResponse(status_code=503, headers={"Retry-After": "5"},
                        content={"error": {"code": "not_ready", "message": "a dependency is unreachable",
                                           "details": [{"dependency": k, "message": v} for k, v in checks.items() if v != "ok"]}})


@router.get("/metrics")
def metrics_route(request: Request) -> Response:
    """Prometheus metrics; with ``LDMQ_METRICS_TOKEN`` set, only for ``Authorization: Bearer <token>``
    (queue depths and tenants' activity are not for the internet)."""
    token = request.app.state.settings.metrics_token
    if token:
        given = request.headers.get("authorization", "").partition(" ")[2].strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "unauthorized", "the metrics need the operator's token (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": "Bearer"})
    return Response(generate_latest(metrics.scrape_registry(request.app.state.settings)), media_type=CONTENT_TYPE_LATEST)
