"""Authentication comes before the body: an anonymous or bad-key request is refused without the
API reading its upload, and an address that keeps failing is slowed down (429 + Retry-After)."""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient

from api.app import create_app


def _asgi_call(app, path: str, headers: list[tuple[bytes, bytes]], body_chunks: int, client=("10.9.8.7", 1234)):
    """Call the app directly, counting how many body chunks it asked for."""
    asked = {"chunks": 0}
    sent: list[dict] = []
    chunk = b"x" * 65536

    async def receive():
        asked["chunks"] += 1
        more = asked["chunks"] < body_chunks
        return {"type": "http.request", "body": chunk, "more_body": more}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": client,
             "server": ("testserver", 80),
             "headers": [(b"content-type", b"multipart/form-data; boundary=xyz"),
                         (b"content-length", str(body_chunks * len(chunk)).encode()), *headers]}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, asked["chunks"], {k.decode(): v.decode() for k, v in
                                     next(m for m in sent if m["type"] == "http.response.start")["headers"]}


def test_a_bad_key_is_refused_before_the_upload_is_read(settings):
    app = create_app(settings.model_copy(update={"max_body_bytes": 64 << 20}))
    for headers in ([], [(b"authorization", b"Bearer not-a-key")], [(b"authorization", b"Basic abc")]):
        status, chunks, _ = _asgi_call(app, "/v1/jobs/sample/csv", headers, body_chunks=100)
        assert status == 401 and chunks == 0


def test_a_good_key_reaches_the_route_and_is_looked_up_once(settings, make_tenant, monkeypatch):
    from api import deps

    _, key = make_tenant()
    calls = []
    real = deps.authenticate
    monkeypatch.setattr(deps, "authenticate", lambda s, k: calls.append(k) or real(s, k))
    app = create_app(settings.model_copy(update={"auth_cache_s": 0}))
    with TestClient(app) as c:
        r = c.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and len(calls) == 1


def test_repeated_bad_keys_are_slowed_per_address(settings, make_tenant):
    _, key = make_tenant()
    app = create_app(settings.model_copy(update={"auth_failure_burst": 5, "auth_failure_per_minute": 6}))
    bad = [(b"authorization", b"Bearer wrong")]
    statuses = [_asgi_call(app, "/v1/jobs", bad, 1, client=("10.0.0.66", 1))[0] for _ in range(7)]
    assert statuses == [401] * 5 + [429] * 2
    status, _, headers = _asgi_call(app, "/v1/jobs", [(b"authorization", f"Bearer {key}".encode())], 1,
                                    client=("10.0.0.66", 1))
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 10  # even a good key waits: the address is slowed
    status, _, _ = _asgi_call(app, "/v1/jobs", [(b"authorization", f"Bearer {key}".encode())], 1,
                              client=("10.0.0.77", 1))
    assert status != 429  # another address is not


def test_the_throttle_refills_with_time():
    from api.auth import FailureThrottle

    now = [0.0]
    t = FailureThrottle(burst=2, per_minute=60, clock=lambda: now[0])
    asyncio.run(t.failed("a"))
    asyncio.run(t.failed("a"))
    assert asyncio.run(t.retry_after("a")) == 1.0 and asyncio.run(t.retry_after("b")) == 0.0
    now[0] += 1.0
    assert asyncio.run(t.retry_after("a")) == 0.0
