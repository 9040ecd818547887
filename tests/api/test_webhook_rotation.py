"""Rotating the webhook signing secret over the API: old and new both verify during the grace
period, only the new one after it."""

from __future__ import annotations

from datetime import timedelta

from shared.db import session_scope
from shared.models import Tenant, utcnow
from shared.processes.webhook_sender import WebhookSettings, deliver_once
from shared.webhooks import verify_signature
from tests.receivers import Receiver


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def deliver_one(client, settings, key, model_id, rx) -> tuple[dict, bytes]:
    r = client.post("/v1/jobs/sample", headers=auth(key), json={
        "model": model_id, "prompts": [{"prompt": "a"}], "webhook": {"url": rx.url + "/hook", "events": ["canceled"]}})
    client.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=auth(key))
    before = len(rx.got)
    deliver_once(settings, WebhookSettings(settle_s=0, block_private=False, timeout_s=5, lease_s=30))
    assert len(rx.got) == before + 1
    _, headers, body = rx.got[-1]
    return headers, body


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
