"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import gc
import threading
import time
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
from fastapi import FastAPI, HTTPException

from api import metrics
from api.auth import AuthFirst, FailureThrottle, KeyCache, TenantRate
from api.deps import lookup_tenant
from api.errors import error_response, install_error_handlers
from api.ratelimit import make_buckets
from api.routes import dashboard, datasets, images, jobs, models, ops, schedulers, usage, webhooks
from api.services.estimates import default_seconds_per_step
from api.services.stream import StreamSlots, close_streams_on_exit_signals
from shared.settings import Settings, get_settings


class BodyLimit:
    """Pure ASGI middleware: refuse bodies over ``limit`` bytes with 413 before reading them all;
    paths under a prefix of ``limits`` get that prefix's limit instead (dataset uploads)."""

    def __init__(self, app, limit: int, limits: dict[str, int] | None = None):
        self.app, self.default, self.limits = app, limit, limits or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        limit = next((v for p, v in self.limits.items() if path == p or path.startswith(p + "/")), self.default)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(scope, receive, send, limit)
        seen = 0
        too_large = False

        async def limited_receive():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    too_large = True
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._too_large(scope, receive, send, limit)

    async def _too_large(self, scope, receive, send, limit: int):
        resp = error_response(413, "payload_too_large", f"the request body is larger than {limit} bytes")
        await resp(scope, receive, send)


class _TooLarge(HTTPException):
    """Raised from ``receive``; an HTTPException so FastAPI's body parsing re-raises it as is."""

    def __init__(self) -> None:
        super().__init__(413, "the request body is too large")


class RequestMetrics:
    """Pure ASGI middleware: count and time every HTTP request by route template and status.
    (Starlette's ``BaseHTTPMiddleware`` would add a task and a response stream copy per request.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}  # what the client gets if the app raises before answering

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")  # the router sets it on this scope
            metrics.REQUESTS.labels(scope["method"], path, str(status["code"])).inc()
            metrics.LATENCY.labels(scope["method"], path).observe(time.perf_counter() - start)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    # Everything imported and built so far lives as long as the process: move it out of the
    # collector's sight. Without this a full collection walked ~110k start-up objects every ~13 s
    # at 100 submits/s and held the event loop ~90 ms each time (the p99; docs/benchmarks.md).
    gc.collect()
    gc.freeze()
    # Sync routes, commits and key lookups share this many threads. More threads than this add no
    # throughput (one GIL) but many switch-happy contenders once a burst queues: at 40 (anyio's
    # default) a short stall snowballed into seconds of latency at 100 submits/s.
    anyio.to_thread.current_default_thread_limiter().total_tokens = app.state.settings.api_threads
    app.state.commit_limiter = anyio.CapacityLimiter(app.state.settings.api_threads)
    close_streams_on_exit_signals(app.state.stream_stop)
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    default_seconds_per_step()  # a bad LDMQ_ESTIMATE_SECONDS_PER_STEP fails here, at start-up
    app = FastAPI(
        title="ldmq",
        version="1",
        description="A job-queue backend for latent diffusion: training and image-generation jobs.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.key_cache = KeyCache(settings.auth_cache_s)
    app.state.stream_slots = StreamSlots(settings.stream_max_per_tenant)
    app.state.stream_stop = threading.Event()  # set when the process is asked to exit
    install_error_handlers(app)
    for r in (jobs.router, models.router, datasets.router, images.router, webhooks.router, schedulers.router, usage.router, ops.router,
              dashboard.router):
        app.include_router(r)

    buckets = make_buckets(settings.effective_ratelimit_redis_url)  # shared by every API process
    app.add_middleware(AuthFirst, cache=app.state.key_cache,
                       throttle=FailureThrottle(settings.auth_failure_burst, settings.auth_failure_per_minute, buckets),
                       lookup=lambda key: lookup_tenant(settings, key), routes=app.router.routes,
                       rate=TenantRate(settings, buckets))
    app.add_middleware(RequestMetrics)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, limits={
        "/v1/datasets": settings.dataset_max_bytes,
        # The image itself is bounded by input_image_max_bytes (a 413 naming it); this leaves room for the form.
        "/v1/images": max(settings.max_body_bytes, settings.input_image_max_bytes + 2**16)})
    return app
