"""``ldmq api --workers 2``: two API processes behind one port, one metrics view."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import Proc, free_port, settings_env

pytestmark = pytest.mark.slow


def _count(metrics_text: str, route: str) -> float:
    pattern = rf'^ldmq_http_requests_total\{{[^}}]*route="{re.escape(route)}"[^}}]*\}} (\S+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, metrics_text, re.M))


def test_two_api_processes_share_their_request_metrics(settings, tmp_path, wait_until):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # 60 requests without a key from one address: more failures than the default throttle allows.
    env = {**settings_env(settings), "LDMQ_AUTH_FAILURE_BURST": "1000"}
    api = Proc(["api", "--port", str(port), "--log-level", "warning", "--workers", "2"], env, tmp_path / "api.log")
    try:
        def up():
            if api.p.poll() is not None:
                raise RuntimeError("api exited:\n" + api.output())
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 90, "the API to answer /healthz")
        # New connections each time, so the kernel spreads them over both processes.
        for _ in range(60):
            with httpx.Client(base_url=url) as c:
                assert c.get("/healthz").status_code == 200
                assert c.get("/v1/jobs").status_code == 401  # no key: counted too
        # Every scrape, whichever process answers it, counts every process's requests.
        counts = {_count(httpx.get(url + "/metrics").text, "/healthz") for _ in range(6)}
        assert min(counts) >= 61  # the 60 here and at least one readiness probe
        assert _count(httpx.get(url + "/metrics").text, "/v1/jobs") == 60
        text = httpx.get(url + "/metrics").text
        assert re.search(r'^ldmq_jobs\b|^# TYPE ldmq_jobs gauge', text, re.M)
    finally:
        api.stop()
