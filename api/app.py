"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import time

from fastapi import FastAPI, HTTPException

from api import metrics
from api.errors import error_response, install_error_handlers
from api.routes import dashboard, datasets, jobs, models, ops, webhooks
from api.services.jobs import default_seconds_per_step
from shared.settings import Settings, get_settings


class BodyLimit:
    """Pure ASGI middleware: refuse bodies over ``limit`` bytes with 413 before reading them all."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        seen = 0
        too_large = False

        async def limited_receive():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope, receive, send):
        resp = error_response(413, "payload_too_large", f"the request body is larger than {self.limit} bytes")
        await resp(scope, receive, send)


class _TooLarge(HTTPException):
    """Raised from ``receive``; an HTTPException so FastAPI's body parsing re-raises it as is."""

    def __init__(self) -> None:
        super().__init__(413, "the request body is too large")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    default_seconds_per_step()  # a bad LDMQ_ESTIMATE_SECONDS_PER_STEP fails here, at start-up
    app = FastAPI(
        title="ldmq",
        version="1",
        description="A job-queue backend for latent diffusion: training and image-generation jobs.",
    )
    app.state.settings = settings
    install_error_handlers(app)
    for r in (jobs.router, models.router, datasets.router, webhooks.router, ops.router, dashboard.router):
        app.include_router(r)

    @app.middleware("http")
    async def _metrics(request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        metrics.LATENCY.labels(request.method, path).observe(time.perf_counter() - start)
        return response

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
