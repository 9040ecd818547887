"""Rotating the webhook signing secret over the API: old and new both verify during the grace
period, only the new one after it."""

from __future__ import annotations

import http.server
import threading
from datetime import timedelta

from shared.db import session_scope
from shared.models import Tenant, utcnow
from shared.processes.webhook_sender import WebhookSettings, deliver_once
from shared.webhooks import verify_signature


def auth(key):
    return {"Authorization": f"Bearer {key}"}


class Receiver:
    def __init__(self):
        self.got: list[tuple[dict, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.got.append((dict(self.headers), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def deliver_one(client, settings, key, model_id, rx) -> tuple[dict, bytes]:
    r = client.post("/v1/jobs/sample", headers=auth(key), json={
        "model": model_id, "prompts": [{"prompt": "a"}], "webhook": {"url": rx.url, "events": ["canceled"]}})
    client.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=auth(key))
    before = len(rx.got)
    deliver_once(settings, WebhookSettings(settle_s=0, block_private=False, timeout_s=5, lease_s=30))
    assert len(rx.got) == before + 1
    return rx.got[-1]


def test_rotation_keeps_the_old_secret_valid_for_the_grace_period(client, settings, tiny_model):
    tenant_id, key, model_id = tiny_model
    old = client.get("/v1/webhooks/secret", headers=auth(key)).json()
    assert old["previous_valid_until"] is None
    r = client.post("/v1/webhooks/secret/rotate", headers=auth(key))
    assert r.status_code == 200
    new = r.json()
    assert new["secret"] != old["secret"] and new["previous_valid_until"] is not None
    assert client.get("/v1/webhooks/secret", headers=auth(key)).json()["secret"] == new["secret"]
    rx = Receiver()
    try:
        headers, body = deliver_one(client, settings, key, model_id, rx)
        ts, sig = headers["X-Ldmq-Timestamp"], headers["X-Ldmq-Signature"]
        assert sig.count("sha256=") == 2
        assert verify_signature(new["secret"], body, ts, sig) and verify_signature(old["secret"], body, ts, sig)
        assert not verify_signature("not-the-secret", body, ts, sig)
        with session_scope(settings) as s:  # the grace period ends
            s.get(Tenant, tenant_id).webhook_secret_previous_until = utcnow() - timedelta(seconds=1)
        headers, body = deliver_one(client, settings, key, model_id, rx)
        ts, sig = headers["X-Ldmq-Timestamp"], headers["X-Ldmq-Signature"]
        assert sig.count("sha256=") == 1
        assert verify_signature(new["secret"], body, ts, sig) and not verify_signature(old["secret"], body, ts, sig)
    finally:
        rx.close()
    assert client.get("/v1/webhooks/secret", headers=auth(key)).json()["previous_valid_until"] is None
