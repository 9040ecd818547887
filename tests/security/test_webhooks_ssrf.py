"""Hostile webhook URLs: the sender refuses internal destinations by default (loopback, private,
link-local metadata, shared, reserved, hostnames that resolve there), never follows a redirect,
and its records never hold what a receiver answered."""

from __future__ import annotations

import pytest

from shared.processes.webhook_sender import WebhookSettings, deliver_once
from tests.receivers import Receiver as Server


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def ws(**kw) -> WebhookSettings:
    return WebhookSettings(**{**dict(backoff_s=0.05, jitter=0.0, settle_s=0.0, timeout_s=5, lease_s=30,
                                      max_attempts=5), **kw})


def submit_with_webhook(client, key, model_id, url) -> str:
    r = client.post("/v1/jobs/sample", headers=auth(key), json={
        "model": model_id, "prompts": [{"prompt": "a"}], "webhook": {"url": url, "events": ["canceled"]}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code in (200, 202)
    return job_id


def delivery(client, key, job_id) -> dict:
    (d,) = client.get(f"/v1/jobs/{job_id}/webhook-deliveries", headers=auth(key)).json()["items"]
    return d


def test_the_default_refuses_loopback(client, settings, tiny_model):
    assert WebhookSettings().block_private is True
    _, key, model_id = tiny_model
    srv = Server()
    try:
        job_id = submit_with_webhook(client, key, model_id, srv.url + "/hook")
        deliver_once(settings, ws())
        assert srv.paths == []
    finally:
        srv.close()
    d = delivery(client, key, job_id)
    assert d["last_status_code"] is None and "non-public address 127.0.0.1" in d["last_error"]


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://[::1]:9/x",
    "http://10.0.0.1/x",
    "http://100.64.0.1/x",
    "http://0.0.0.0:9/x",
    "http://localhost:9/x",  # a name that resolves to loopback
    "http://[::ffff:127.0.0.1]:9/x",
])
def test_internal_destinations_are_refused_without_a_connection(client, settings, tiny_model, url):
    _, key, model_id = tiny_model
    job_id = submit_with_webhook(client, key, model_id, url)
    deliver_once(settings, ws())
    d = delivery(client, key, job_id)
    assert d["last_status_code"] is None and d["last_error"].startswith("refused:"), d


def test_a_redirect_is_not_followed(client, settings, tiny_model):
    """With the block off (receivers on loopback), a 302 towards another address ends the attempt."""
    _, key, model_id = tiny_model
    target = Server()
    redirector = Server(status=302, headers={"Location": target.url + "/internal"})
    try:
        job_id = submit_with_webhook(client, key, model_id, redirector.url + "/hook")
        deliver_once(settings, ws(block_private=False))
        assert redirector.paths == ["/hook"] and target.paths == []
    finally:
        target.close()
        redirector.close()
    d = delivery(client, key, job_id)
    assert d["status"] == "pending" and d["last_status_code"] == 302


def test_records_never_hold_the_receivers_answer(client, settings, tiny_model):
    _, key, model_id = tiny_model
    srv = Server(status=500, body=b"db password is hunter2; internal host 10.1.2.3")
    try:
        job_id = submit_with_webhook(client, key, model_id, srv.url + "/hook")
        deliver_once(settings, ws(block_private=False))
    finally:
        srv.close()
    d = delivery(client, key, job_id)
    assert d["last_status_code"] == 500 and d["last_error"] == "HTTP 500 Internal Server Error"
    assert "hunter2" not in str(d) and "10.1.2.3" not in str(d)
