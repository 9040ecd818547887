"""Two real API processes sharing one Redis: a tenant's accepted rate is its rate, not twice it,
and failed authentications from one address are counted together."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from shared import tenants
from shared.db import session_scope
from tests.conftest import Proc, free_port, settings_env, wait_until

pytestmark = pytest.mark.slow

RATE, BURST, SECONDS = 5.0, 5, 3.0


def _start_apis(settings, tmp_path, env_extra: dict[str, str]) -> tuple[list[Proc], list[str]]:
    env = {**settings_env(settings), **env_extra}
    procs, urls = [], []
    for i in range(2):
        port = free_port()
        procs.append(Proc(["api", "--port", str(port), "--log-level", "warning"], env, tmp_path / f"api{i}.log"))
        urls.append(f"http://127.0.0.1:{port}")
    for p, url in zip(procs, urls):
        def up(p=p, url=url):
            if p.p.poll() is not None:
                raise RuntimeError("api exited:\n" + p.output())
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 90, f"the API at {url} to answer /healthz")
    return procs, urls


def _flood(urls: list[str], key: str, seconds: float, threads: int = 4) -> tuple[dict, float, set]:
    """GET /v1/jobs from ``threads`` threads, alternating between the processes, for ``seconds``;
    per process: (accepted, refused) counts; and the Retry-After values seen."""
    counts = {u: [0, 0] for u in urls}
    retry_after: set[str] = set()
    lock = threading.Lock()
    start = time.monotonic()

    def go(offset: int):
        clients = [httpx.Client(base_url=u, headers={"Authorization": f"Bearer {key}"}, timeout=10) for u in urls]
        i = offset
        while time.monotonic() - start < seconds:
            c = clients[i % 2]
            r = c.get("/v1/jobs?limit=1")
            with lock:
                counts[str(c.base_url).rstrip("/")][0 if r.status_code == 200 else 1] += 1
                if r.status_code == 429:
                    assert r.json()["error"]["code"] == "rate_limited"
                    retry_after.add(r.headers["Retry-After"])
                else:
                    assert r.status_code == 200, r.text
            i += 1
        for c in clients:
            c.close()

    ts = [threading.Thread(target=go, args=(n,)) for n in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return counts, time.monotonic() - start, retry_after


def test_two_api_processes_share_a_tenants_rate_and_the_failure_throttle(settings, make_tenant, redis_url, tmp_path):
    import redis

    name = f"rate-{settings.storage_url[-8:]}"
    tid, key = make_tenant(name)
    with session_scope(settings) as s:
        tenants.set_tenant_settings(s, name, {"rate_per_s": RATE, "rate_burst": BURST})
    procs, urls = _start_apis(settings, tmp_path, {"LDMQ_AUTH_FAILURE_BURST": "6", "LDMQ_AUTH_FAILURE_PER_MINUTE": "6"})
    r = redis.Redis.from_url(redis_url)
    try:
        for url in urls:  # a first request warms each process (connections, the key cache) ...
            assert httpx.get(url + "/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        r.delete(f"ldmq:rl:tenant:{tid}")  # ... then the flood starts with a full bucket
        counts, elapsed, retry_after = _flood(urls, key, SECONDS)
        accepted = sum(a for a, _ in counts.values())
        allowed = BURST + RATE * elapsed  # what one bucket lets through in that time
        # Each process alone was sent more than one bucket allows, so per-process buckets would
        # have accepted about twice ``allowed``; the shared bucket accepts ``allowed``.
        assert all(a + b > allowed for a, b in counts.values()), counts
        assert all(a >= 1 for a, _ in counts.values()), counts  # both processes served the tenant
        assert allowed / 2 < accepted <= allowed + 1, (counts, elapsed)  # the rate: not twice it, not half
        assert retry_after and all(v.isdigit() and int(v) >= 1 for v in retry_after), retry_after

        # Failed authentications: 6 from this address in all, whichever process answers.
        r.delete("ldmq:rl:authfail:127.0.0.1")
        statuses = [httpx.get(urls[i % 2] + "/v1/jobs", headers={"Authorization": "Bearer ldmq_x_y"}).status_code
                    for i in range(8)]
        assert statuses == [401] * 6 + [429] * 2
    finally:
        r.delete("ldmq:rl:authfail:127.0.0.1")
        for p in procs:
            p.stop()
