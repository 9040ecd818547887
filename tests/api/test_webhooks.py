"""Webhooks against a real HTTP receiver on loopback: signed POSTs built from the job_events
outbox, the events filter, retries with back-off after a 500, giving up, and concurrent senders.
The job's states are driven with shared.jobstate (what a worker does), so no worker runs here
except in the slow end-to-end test at the bottom."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from shared import jobstate
from shared.db import session_scope
from shared.models import JobStatus, JobWebhook, WebhookDelivery
from shared.processes.webhook_sender import WebhookSettings, backoff_delay, deliver_once, scan
from shared.train_schema import TrainParams
from shared.webhooks import sign, verify_signature

REPO = Path(__file__).resolve().parents[2]


def auth(key):
    return {"Authorization": f"Bearer {key}"}


class Receiver:
    """A threading http.server that records every POST; ``fail_first`` event types answer 500 the
    first time they arrive; paths starting with /always500 always answer 500."""

    def __init__(self, fail_first=()):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.fail_first = set(fail_first)
        self.failed: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                event = self.headers.get("X-Ldmq-Event", "")
                with outer.lock:
                    if self.path.startswith("/always500"):
                        status = 500
                    elif event in outer.fail_first and event not in outer.failed:
                        outer.failed.add(event)
                        status = 500
                    else:
                        status = 200
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                           "status": status})
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"nope" if status == 500 else b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def received(self, path=None):
        with self.lock:
            return [r for r in self.requests if path is None or r["path"] == path]


def fast(**kw) -> WebhookSettings:
    # The receivers here listen on loopback, which the sender refuses by default.
    base = dict(backoff_s=0.05, jitter=0.0, settle_s=0.0, interval_s=0.05, timeout_s=5, lease_s=30, max_attempts=5,
                block_private=False)
    return WebhookSettings(**{**base, **kw})


def run_sample_job(settings, job_id, *, rows=1):
    """What a worker does: claim, progress, one output per row, succeed (each writes its event)."""
    with session_scope(settings) as s:
        claim = jobstate.claim(s, job_id, "test-worker", 30)
    with session_scope(settings) as s:
        jobstate.set_progress(s, job_id, claim.attempt, 0.5, {"images_done": 1})
    for row in range(1, rows + 1):
        with session_scope(settings) as s:
            jobstate.record_output(s, job_id, claim.attempt, row=row, index=0, seed=row, key=f"k/{row}", width=8,
                                   height=8, sha256="0" * 64)
    with session_scope(settings) as s:
        jobstate.finish(s, job_id, claim.attempt, JobStatus.succeeded)


def cancel_queued(client, key):
    """Cancel the tenant's queued jobs: their wake-up messages stay in the shared broker, and a
    later test's worker should not spend minutes running them."""
    for job in client.get("/v1/jobs", headers=auth(key), params={"status": "queued", "limit": 200}).json()["items"]:
        assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key)).json()["status"] == "canceled"


def drain_broker(broker_url: str) -> None:
    """Drop wake-up messages left by earlier tests that ran no worker (their jobs are not this
    test's), so that the worker started here runs only this test's jobs."""
    import redis

    from shared.queue import QUEUE_FOR_TYPE

    r = redis.Redis.from_url(broker_url)
    for q in QUEUE_FOR_TYPE.values():
        for k in list(r.scan_iter(match=f"{q}*")):
            r.delete(k)


def deliveries(client, key, job_id):
    r = client.get(f"/v1/jobs/{job_id}/webhook-deliveries", headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_signed_deliveries_with_filter_and_retry_after_500(client, settings, tiny_model, wait_until):
    _, key, model_id = tiny_model
    with Receiver(fail_first={"started"}) as rx:
        r = client.post("/v1/jobs/sample", headers=auth(key), json={
            "model": model_id, "prompts": [{"prompt": "a"}, {"prompt": "b"}],
            "webhook": {"url": rx.url + "/hook", "events": ["started", "row_done", "succeeded"]}})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["webhook"] == {"url": rx.url + "/hook", "events": ["started", "row_done", "succeeded"]}
        assert "webhook" not in job["params"]
        assert client.get(f"/v1/jobs/{job['id']}", headers=auth(key)).json()["webhook"]["url"] == rx.url + "/hook"
        run_sample_job(settings, job["id"], rows=2)
        ws = fast()

        def all_delivered():
            deliver_once(settings, ws)
            items = deliveries(client, key, job["id"])
            return items if len(items) == 4 and all(d["status"] == "delivered" for d in items) else None

        items = wait_until(all_delivered, 30, "every delivery to succeed")
        secret = client.get("/v1/webhooks/secret", headers=auth(key)).json()["secret"]

    got = rx.received("/hook")
    # The filter: 'progress' happened but was not subscribed to.
    assert Counter(json.loads(g["body"])["type"] for g in got if g["status"] == 200) == {
        "started": 1, "row_done": 2, "succeeded": 1}
    # The retry: 'started' first got a 500, then the same event again as attempt 2.
    started = [g for g in got if g["headers"]["X-Ldmq-Event"] == "started"]
    assert [g["status"] for g in started] == [500, 200]
    assert [g["headers"]["X-Ldmq-Delivery-Attempt"] for g in started] == ["1", "2"]
    assert started[0]["body"] == started[1]["body"]
    by_type = {d["event_type"]: d for d in items}
    assert by_type["started"]["attempts"] == 2 and by_type["started"]["last_status_code"] == 200
    assert by_type["succeeded"]["attempts"] == 1 and by_type["succeeded"]["delivered_at"]
    # Every request is signed with the tenant's secret over "<timestamp>.<body>".
    for g in got:
        h = g["headers"]
        assert h["X-Ldmq-Signature"] == sign(secret, h["X-Ldmq-Timestamp"], g["body"])
        assert verify_signature(secret, g["body"], h["X-Ldmq-Timestamp"], h["X-Ldmq-Signature"])
        assert not verify_signature(secret, g["body"] + b" ", h["X-Ldmq-Timestamp"], h["X-Ldmq-Signature"])
        assert not verify_signature("another-secret", g["body"], h["X-Ldmq-Timestamp"], h["X-Ldmq-Signature"])
        body = json.loads(g["body"])
        assert body["job_id"] == job["id"] and body["job_type"] == "sample"
        assert h["X-Ldmq-Event-Id"] == str(body["event_id"]) and h["Content-Type"] == "application/json"
    rows = sorted(json.loads(g["body"])["data"]["row"] for g in got if g["headers"]["X-Ldmq-Event"] == "row_done")
    assert rows == [1, 2]
    # A stale timestamp fails verification even with the right signature (no replays).
    g = got[-1]
    ts = g["headers"]["X-Ldmq-Timestamp"]
    assert not verify_signature(secret, g["body"], ts, sign(secret, ts, g["body"]), now=int(ts) + 3600)
    # Once the final event is behind the cursor, the job's webhook is done: no more scanning.
    with session_scope(settings) as s:
        hook = s.get(JobWebhook, job["id"])
        assert hook.done and hook.scanned_through > 0
    # The API's /metrics counts deliveries by state.
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for f in text_string_to_metric_families(client.get("/metrics").text) for x in f.samples}
    assert samples[("ldmq_webhook_deliveries", (("status", "delivered"),))] >= 4
    assert ("ldmq_webhook_oldest_due_seconds", ()) in samples


def test_gives_up_after_max_attempts_and_records_errors(client, settings, tiny_model, wait_until):
    _, key, model_id = tiny_model
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/x"
    with Receiver() as rx:
        ids = {}
        for name, url in (("500", rx.url + "/always500"), ("dead", dead)):
            r = client.post("/v1/jobs/sample", headers=auth(key), json={
                "model": model_id, "prompts": [{"prompt": "a"}], "webhook": {"url": url, "events": ["canceled"]}})
            ids[name] = r.json()["id"]
            assert client.post(f"/v1/jobs/{ids[name]}/cancel", headers=auth(key)).json()["status"] == "canceled"
        ws = fast(max_attempts=3)

        def all_failed():
            deliver_once(settings, ws)
            items = [d for i in ids.values() for d in deliveries(client, key, i)]
            return items if len(items) == 2 and all(d["status"] == "failed" for d in items) else None

        wait_until(all_failed, 30, "both deliveries to give up")
        assert len(rx.received("/always500")) == 3
    (d500,) = deliveries(client, key, ids["500"])
    assert d500["attempts"] == 3 and d500["last_status_code"] == 500 and d500["last_error"].startswith("HTTP 500")
    (ddead,) = deliveries(client, key, ids["dead"])
    assert ddead["attempts"] == 3 and ddead["last_status_code"] is None and "ConnectError" in ddead["last_error"]
    # Final: more passes send nothing.
    assert deliver_once(settings, ws)["sent"] == 0


def test_backoff_grows_exponentially_with_a_cap():
    ws = WebhookSettings(backoff_s=2, backoff_max_s=10, jitter=0)
    assert [backoff_delay(n, ws) for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]
    jittered = WebhookSettings(backoff_s=100, jitter=0.1)
    assert all(90 <= backoff_delay(1, jittered) <= 110 for _ in range(50))
    with pytest.raises(ValueError, match="lease_s"):
        WebhookSettings(timeout_s=30, lease_s=10)


def test_unsettled_events_keep_the_cursor_and_rescans_add_nothing(client, settings, tiny_model):
    _, key, model_id = tiny_model
    r = client.post("/v1/jobs/sample", headers=auth(key), json={
        "model": model_id, "prompts": [{"prompt": "a"}], "webhook": {"url": "http://127.0.0.1:9/h"}})
    job_id = r.json()["id"]
    assert r.json()["webhook"]["events"] == ["started", "succeeded", "failed", "canceled"]  # the default
    run_sample_job(settings, job_id)
    slow = fast(settle_s=3600)
    with session_scope(settings) as s:
        assert scan(s, slow) == 2  # started, succeeded
    with session_scope(settings) as s:
        assert scan(s, slow) == 0
        hook = s.get(JobWebhook, job_id)
        assert hook.scanned_through == 0 and not hook.done
    with session_scope(settings) as s:
        assert scan(s, fast()) == 0
        assert s.get(JobWebhook, job_id).done
        assert s.query(WebhookDelivery).filter_by(job_id=job_id).count() == 2


def test_two_senders_at_once_deliver_each_event_once(client, settings, tiny_model, wait_until):
    _, key, model_id = tiny_model
    with Receiver() as rx:
        ids = []
        for i in range(3):
            r = client.post("/v1/jobs/sample", headers=auth(key), json={
                "model": model_id, "prompts": [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}],
                "webhook": {"url": rx.url + "/h", "events": ["started", "row_done", "succeeded"]}})
            ids.append(r.json()["id"])
            run_sample_job(settings, ids[-1], rows=3)
        ws = fast(batch=2, concurrency=2)
        errors = []

        def sender():
            try:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and len(rx.received("/h")) < 15:
                    deliver_once(settings, ws)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=sender) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        got = rx.received("/h")
    event_ids = [json.loads(g["body"])["event_id"] for g in got]
    assert len(event_ids) == 15 and len(set(event_ids)) == 15, Counter(event_ids).most_common(3)


def test_block_private_refuses_loopback(client, settings, tiny_model, wait_until):
    _, key, model_id = tiny_model
    with Receiver() as rx:
        r = client.post("/v1/jobs/sample", headers=auth(key), json={
            "model": model_id, "prompts": [{"prompt": "a"}], "webhook": {"url": rx.url + "/p", "events": ["canceled"]}})
        job_id = r.json()["id"]
        client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))
        deliver_once(settings, fast(block_private=True))
        assert rx.received() == []
    (d,) = deliveries(client, key, job_id)
    assert d["status"] == "pending" and d["attempts"] == 1 and "non-public address 127.0.0.1" in d["last_error"]


def test_webhook_validation_csv_and_train(client, settings, tiny_model):
    _, key, model_id = tiny_model
    base = {"model": model_id, "prompts": [{"prompt": "a"}]}
    r = client.post("/v1/jobs/sample", headers=auth(key), json={**base, "webhook": {"url": "http://h/x", "events": ["done"]}})
    assert r.status_code == 422
    msg = json.dumps(r.json())
    assert "'done'" in msg and "started, progress, row_done, checkpoint, succeeded, failed, canceled" in msg
    r = client.post("/v1/jobs/sample", headers=auth(key), json={**base, "webhook": {"url": "ftp://h/x"}})
    assert r.status_code == 422 and "http" in json.dumps(r.json())
    r = client.post("/v1/jobs/sample", headers=auth(key), json={**base, "webhook": {"url": "http://h/x", "events": []}})
    assert r.status_code == 422
    r = client.post("/v1/jobs/sample", headers=auth(key), json={**base, "webhook": {"url": "http://h/x", "secret": "s"}})
    assert r.status_code == 422

    files = {"file": ("p.csv", b"prompt\na\n", "text/csv")}
    r = client.post("/v1/jobs/sample/csv", headers=auth(key), files=files,
                    data={"model": model_id, "webhook_url": "https://example.test/h", "webhook_events": "row_done, succeeded"})
    assert r.status_code == 202, r.text
    assert r.json()["webhook"] == {"url": "https://example.test/h", "events": ["row_done", "succeeded"]}
    r = client.post("/v1/jobs/sample/csv", headers=auth(key), files=files,
                    data={"model": model_id, "webhook_events": "succeeded"})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "webhook_url"
    r = client.post("/v1/jobs/sample/csv", headers=auth(key), files=files,
                    data={"model": model_id, "webhook_url": "https://example.test/h", "webhook_events": "nope"})
    assert r.status_code == 422 and "valid: started" in json.dumps(r.json())

    # Train: the webhook sits beside the job; the params stay what the worker reads as TrainParams.
    r = client.post("/v1/jobs/train", headers=auth(key), json={
        "dataset": "builtin:digits", "steps": 5, "webhook": {"url": "https://example.test/t", "events": ["checkpoint"]}})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["webhook"] == {"url": "https://example.test/t", "events": ["checkpoint"]}
    assert "webhook" not in job["params"]
    assert TrainParams.model_validate(job["params"]).steps == 5
    # The webhook is part of the request for idempotency.
    h = {**auth(key), "Idempotency-Key": "train-hook"}
    body = {"dataset": "builtin:digits", "steps": 5, "webhook": {"url": "https://example.test/t"}}
    assert client.post("/v1/jobs/train", headers=h, json=body).status_code == 202
    r = client.post("/v1/jobs/train", headers=h, json={**body, "webhook": {"url": "https://example.test/other"}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
    cancel_queued(client, key)


def test_webhook_secret_is_per_tenant(client, make_tenant):
    _, a = make_tenant()
    _, b = make_tenant()
    sa = client.get("/v1/webhooks/secret", headers=auth(a)).json()
    sb = client.get("/v1/webhooks/secret", headers=auth(b)).json()
    assert len(sa["secret"]) == 64 and sa["secret"] != sb["secret"]
    assert sa["signature_header"] == "X-Ldmq-Signature"
    assert client.get("/v1/webhooks/secret", headers=auth(a)).json()["secret"] == sa["secret"]
    assert client.get("/v1/webhooks/secret").status_code == 401


@pytest.mark.slow
def test_ldmq_webhooks_process_delivers_a_real_jobs_events(stack, tiny_pipeline_dir, wait_until, tmp_path):
    """`ldmq api`, `ldmq worker` and `ldmq webhooks` as processes, driven by `ldmq jobs` (the CLI
    over HTTP, with LDMQ_API_URL/LDMQ_API_KEY): a CSV job with a webhook runs, the receiver gets
    its signed events, and the images download."""
    drain_broker(stack.env["LDMQ_BROKER_URL"])
    stack.start_api()
    stack.start_worker(queues="sample")
    key = stack.cli("keys", "create", "--tenant", "hooks").strip().splitlines()[-1]
    model_id = stack.cli("models", "import", str(tiny_pipeline_dir), "--tenant", "hooks").strip().splitlines()[-1]
    api = httpx.Client(base_url=stack.url, headers=auth(key), timeout=30)
    env = {**stack.env, "LDMQ_WEBHOOK_BLOCK_PRIVATE": "false", "LDMQ_WEBHOOK_INTERVAL_S": "0.2", "LDMQ_WEBHOOK_SETTLE_S": "0", "LDMQ_WEBHOOK_BACKOFF_S": "0.2",
           "LDMQ_LOG_FORMAT": "json"}
    cli_env = {**stack.env, "LDMQ_API_URL": stack.url, "LDMQ_API_KEY": key}

    def ldmq(*args, timeout=240):
        return subprocess.run([sys.executable, "-m", "ldmq.cli", *args], env=cli_env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)

    csv_path = tmp_path / "p.csv"
    csv_path.write_bytes(b"prompt,seed\na,1\nb,2\n")
    log_path = tmp_path / "webhooks.log"
    with Receiver(fail_first={"succeeded"}) as rx, open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ldmq.cli", "webhooks"], env=env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            est = ldmq("jobs", "estimate", str(csv_path), "--model", model_id, "--steps", "2")
            assert est.returncode == 0, est.stderr
            assert json.loads(est.stdout)["denoising_steps"] == 4
            sub = ldmq("jobs", "submit", str(csv_path), "--model", model_id, "--steps", "2",
                       "--webhook-url", rx.url + "/e2e", "--webhook-events", "started,row_done,succeeded")
            assert sub.returncode == 0, sub.stderr
            job_id = sub.stdout.strip().splitlines()[-1]
            fol = ldmq("jobs", "follow", job_id, "--follow-timeout", "180")
            assert fol.returncode == 0, fol.stdout + fol.stderr
            assert json.loads(fol.stdout)["status"] == "succeeded" and "100.0% succeeded 2/2 images" in fol.stderr

            def succeeded_delivered():
                return [g for g in rx.received("/e2e") if g["headers"]["X-Ldmq-Event"] == "succeeded" and g["status"] == 200]

            wait_until(succeeded_delivered, 60, "the succeeded event to reach the receiver")
        finally:
            proc.terminate()
            proc.wait(15)
        secret = api.get("/v1/webhooks/secret").json()["secret"]
        got = rx.received("/e2e")
    assert proc.returncode == 0
    ok = [json.loads(g["body"]) for g in got if g["status"] == 200]
    assert sorted(e["type"] for e in ok) == ["row_done", "row_done", "started", "succeeded"]
    assert all(e["job_id"] == job_id for e in ok)
    for g in got:
        assert verify_signature(secret, g["body"], g["headers"]["X-Ldmq-Timestamp"], g["headers"]["X-Ldmq-Signature"])
    # LDMQ_LOG_FORMAT=json: every line the process logged is a JSON object; the failed attempt
    # names the job and its tenant.
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    failed = [rec for rec in lines if "failed: HTTP 500" in rec["message"]]
    assert failed and failed[0]["job_id"] == job_id and failed[0]["tenant_id"]

    dl = ldmq("jobs", "download", job_id, str(tmp_path / "out"))
    assert dl.returncode == 0, dl.stderr
    from PIL import Image

    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["000001-000.png", "000002-000.png"]
    assert all(Image.open(f).size == (32, 32) for f in files)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["job_id"] == job_id
