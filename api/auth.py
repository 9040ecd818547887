"""Bearer API keys: parse the header, remember valid keys for a few seconds, check them before a
request's body is read, and slow down whoever keeps trying bad ones.

Every authenticated request used to cost a database round trip before any work; at hundreds of
submits a second that lookup was a quarter of the API's time. A key found valid is kept for
``Settings.auth_cache_s`` (5 s by default), keyed by its SHA-256 so the process never holds a key
in the clear; revoking a key therefore takes effect within that time. Failures are not cached: a
key created a moment ago works at once.

FastAPI parses a request's body (a multipart upload, a JSON document) before it resolves the
route's dependencies, so an anonymous client could make the API read and parse megabytes before
being told its key is bad. :class:`AuthFirst` checks the key of every ``/v1/`` request in ASGI,
before the body is touched, and hands the tenant on (``scope["state"]["tenant"]``) so the route's
dependency does not look it up again. A client address that fails too often is answered 429 with
``Retry-After`` (:class:`FailureThrottle`, a token bucket per address) until it regains attempts
(a key the cache knows as valid is not held back: it is no guess, and skipping the check saves
every such request a Redis round trip),
and a tenant over its request rate is answered 429 ``rate_limited`` (:class:`TenantRate`). Both
buckets are shared by every API process through Redis (api.ratelimit).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from api.errors import ApiError, error_response
from api.ratelimit import Buckets, LocalBuckets, retry_after_header
from shared.security import TenantRef, hash_key
from shared.settings import Settings
from shared.tenants import effective_rate


def bearer_token(authorization: str) -> str:
    """The key in ``Authorization: Bearer <key>``, or a 401 that says what is missing."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing bearer API key (Authorization: Bearer <key>)",
                       headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


class KeyCache:
    """Valid keys → their tenant, for ``ttl_s`` seconds, at most ``max_entries`` (least recently
    used dropped first). Used from the event loop only, so it needs no lock."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000, clock=time.monotonic):
        self.ttl_s, self.max_entries, self._clock = ttl_s, max_entries, clock
        self._entries: OrderedDict[str, tuple[TenantRef, float]] = OrderedDict()

    def get(self, key: str) -> TenantRef | None:
        if self.ttl_s <= 0:
            return None
        digest = hash_key(key)
        found = self._entries.get(digest)
        if found is None:
            return None
        tenant, expires = found
        if self._clock() >= expires:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return tenant

    def put(self, key: str, tenant: TenantRef) -> None:
        if self.ttl_s <= 0:
            return
        digest = hash_key(key)
        self._entries[digest] = (tenant, self._clock() + self.ttl_s)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class FailureThrottle:
    """Failed authentications per client address: a token bucket of ``burst`` tokens refilled at
    ``per_minute``; each failure spends one; an address with none left is refused (429) until the
    next token. The buckets are ``buckets`` (api.ratelimit: in Redis, so every API process counts
    an address's failures together; per process without Redis)."""

    def __init__(self, burst: int, per_minute: float, buckets: Buckets | None = None, clock=time.monotonic):
        self.burst, self.rate = burst, per_minute / 60.0
        self.buckets = buckets if buckets is not None else LocalBuckets(clock=clock)

    async def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: it may now)."""
        return await self.buckets.take(f"authfail:{client}", self.rate, self.burst, cost=0)

    async def failed(self, client: str) -> None:
        await self.buckets.take(f"authfail:{client}", self.rate, self.burst)


class TenantRate:
    """Each authenticated ``/v1/`` request spends one token of its tenant's bucket (its
    ``rate_per_s`` and ``rate_burst``, else the deployment's ``LDMQ_RATE_PER_S`` and
    ``LDMQ_RATE_BURST``; neither: unlimited). The rate travels with the cached key
    (:class:`shared.security.TenantRef`), so a change by ``ldmq tenants set`` applies within
    ``LDMQ_AUTH_CACHE_S``."""

    def __init__(self, settings: Settings, buckets: Buckets):
        self.settings, self.buckets = settings, buckets

    async def wait(self, tenant: TenantRef) -> float:
        """0.0 when the request may go on (its token spent), else the seconds until it may."""
        limit = effective_rate(tenant.rate_per_s, tenant.rate_burst, self.settings)
        if limit is None:
            return 0.0
        return await self.buckets.take(f"tenant:{tenant.id}", *limit)


class AuthFirst:
    """Pure ASGI middleware: authenticate every ``/v1/`` request before its body is read (see the
    module docstring). ``lookup(key)`` (blocking: run in a thread) returns the tenant or None. A
    lookup that raises (the database is away) is left to the route, whose error handlers answer it."""

    def __init__(self, app, cache: KeyCache, throttle: FailureThrottle, lookup: Callable[[str], TenantRef | None],
                 routes=(), rate: TenantRate | None = None):
        self.app, self.cache, self.throttle, self.lookup, self.routes = app, cache, throttle, lookup, routes
        self.rate = rate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        self._note_route(scope)
        client = (scope.get("client") or ("unknown", 0))[0]
        headers = dict(scope.get("headers") or [])
        try:
            key = bearer_token(headers.get(b"authorization", b"").decode("latin-1"))
        except ApiError as exc:
            return await self._refused(scope, receive, send, client, exc)
        # A key remembered as valid is no guess: it skips the failure throttle (a Redis round
        # trip). Anything else is checked against it before the lookup.
        tenant = self.cache.get(key)
        if tenant is None:
            if (wait := await self.throttle.retry_after(client)) > 0:
                return await self._too_many(scope, receive, send, wait, "too many failed authentications from "
                                            "this address")
            try:
                tenant = await run_in_threadpool(self.lookup, key)
            except Exception:
                return await self.app(scope, receive, send)  # the route's own lookup reports it
            if tenant is None:
                exc = ApiError(401, "unauthorized", "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
                return await self._refused(scope, receive, send, client, exc, checked=True)
            self.cache.put(key, tenant)
        if self.rate is not None and (wait := await self.rate.wait(tenant)) > 0:
            return await self._too_many(scope, receive, send, wait, "this tenant's request rate is spent")
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)

    async def _refused(self, scope, receive, send, client: str, exc: ApiError, checked: bool = False):
        """A failed authentication: 429 if the address has no attempts left (``checked``: already
        asked), else counted and answered."""
        if not checked and (wait := await self.throttle.retry_after(client)) > 0:
            return await self._too_many(scope, receive, send, wait, "too many failed authentications from this address")
        await self.throttle.failed(client)
        return await error_response(exc.status, exc.code, exc.message, headers=exc.headers)(scope, receive, send)

    @staticmethod
    async def _too_many(scope, receive, send, wait: float, why: str):
        after = retry_after_header(wait)
        resp = error_response(429, "rate_limited", f"{why}; retry in {after} s", headers={"Retry-After": after})
        return await resp(scope, receive, send)

    def _note_route(self, scope) -> None:
        """Set the route a refused request was for, as the router would have: request metrics are
        labelled by route template, answered here or by the route."""
        from starlette.routing import Match

        for route in _flat(self.routes):
            match, _ = route.matches(scope)
            if match != Match.NONE:
                scope["route"] = route
                return


def _flat(routes):
    """The endpoint routes under ``routes``, included routers opened (FastAPI keeps those whole)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flat(inner.routes)
        else:
            yield route
