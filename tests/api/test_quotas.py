"""Per-tenant quotas and request rates over the real app (Postgres, Redis, S3): 429 quota_exceeded
with nothing stored, even under a race; replays pass; dry runs say what a submit would get;
429 rate_limited with Retry-After; GET /v1/usage."""

from __future__ import annotations

import io
from datetime import timedelta

from sqlalchemy import func, select

from shared import tenants
from shared.db import session_scope
from shared.models import Job, JobRow, JobStatus, Tenant, utcnow
from tests.conftest import race


def auth(key, **more):
    return {"Authorization": f"Bearer {key}", **more}


def set_limits(settings, tenant_id: str, **changes) -> None:
    with session_scope(settings) as s:
        name = s.get(Tenant, tenant_id).name
        tenants.set_tenant_settings(s, name, changes)


def counts(settings, tenant_id: str) -> tuple[int, int]:
    with session_scope(settings) as s:
        jobs = s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id))
        rows = s.scalar(select(func.count()).select_from(JobRow).join(Job).where(Job.tenant_id == tenant_id))
    return jobs, rows


def sample(model_id: str, images: int) -> dict:
    return {"model": model_id, "prompts": [{"prompt": "a cat", "num_images": images, "seed": 1}], "steps": 2}


def test_over_the_queued_images_quota_is_429_and_nothing_is_stored(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    set_limits(settings, tid, max_queued_images=5)
    assert client.post("/v1/jobs/sample", headers=auth(key), json=sample(model_id, 3)).status_code == 202
    before = counts(settings, tid)

    r = client.post("/v1/jobs/sample", headers=auth(key), json=sample(model_id, 3))
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == "quota_exceeded"
    assert "quota of 5 queued images" in err["message"] and "3 are queued or in progress" in err["message"]
    assert err["details"][0] | {"message": None} == {"quota": "max_queued_images", "limit": 5, "current": 3,
                                                     "requested": 3, "message": None}
    csv = b"prompt,num_images\na,2\nb,1\n"
    r = client.post("/v1/jobs/sample/csv", headers=auth(key), data={"model": model_id},
                    files={"file": ("p.csv", io.BytesIO(csv), "text/csv")})
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    assert counts(settings, tid) == before  # no job, no rows

    # Two images fit; then a train job (which counts one) no longer does.
    assert client.post("/v1/jobs/sample", headers=auth(key), json=sample(model_id, 2)).status_code == 202
    r = client.post("/v1/jobs/train", headers=auth(key), json={"dataset": "builtin:digits", "steps": 5})
    assert r.status_code == 429 and "1 image(s)" in r.json()["error"]["message"]

    # Made images leave the count: once a job has ended, its room is free again.
    with session_scope(settings) as s:
        s.query(Job).filter(Job.tenant_id == tid).update({"status": JobStatus.succeeded.value})
    assert client.post("/v1/jobs/train", headers=auth(key), json={"dataset": "builtin:digits", "steps": 5}).status_code == 202


def test_a_replay_is_not_refused_and_a_dry_run_says_what_a_submit_would_get(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    set_limits(settings, tid, max_queued_images=4)
    h = auth(key, **{"Idempotency-Key": "q-1"})
    first = client.post("/v1/jobs/sample", headers=h, json=sample(model_id, 4))
    assert first.status_code == 202
    again = client.post("/v1/jobs/sample", headers=h, json=sample(model_id, 4))  # the queue is full now
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"

    dry = client.post("/v1/jobs/sample?dry_run=true", headers=auth(key), json=sample(model_id, 1))
    assert dry.status_code == 200
    assert dry.json()["quota"] == {"max_queued_images": 4, "images_queued": 4, "images_requested": 1,
                                   "would_exceed": True}
    set_limits(settings, tid, max_queued_images=None)
    dry = client.post("/v1/jobs/sample?dry_run=true", headers=auth(key), json=sample(model_id, 1)).json()
    assert dry["quota"]["would_exceed"] is False and dry["quota"]["max_queued_images"] is None
    assert counts(settings, tid)[0] == 1


def test_racing_submits_cannot_pass_the_quota_together(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    set_limits(settings, tid, max_queued_images=5)
    # 16 threads, one image each, 8 route threads: without the tenant-row lock several count the
    # same queue at once and all insert (with the lock removed this test failed 3 runs out of 3).
    results = race(16, lambda: client.post("/v1/jobs/sample", headers=auth(key), json=sample(model_id, 1)))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [202] * 5 + [429] * 11, [r.text for r in results if r.status_code not in (202, 429)]
    assert {r.json()["error"]["code"] for r in results if r.status_code == 429} == {"quota_exceeded"}
    assert counts(settings, tid) == (5, 5)


def test_over_the_rate_is_429_with_retry_after_and_other_tenants_are_not(client, settings, tiny_model, make_tenant):
    tid, key, model_id = tiny_model
    set_limits(settings, tid, rate_per_s=0.2, rate_burst=2)  # before the key is first used (and cached)
    _, other = make_tenant()
    assert [client.get("/v1/jobs", headers=auth(key)).status_code for _ in range(2)] == [200, 200]
    r = client.post("/v1/jobs/sample", headers=auth(key), json=sample(model_id, 1))
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 5  # one request's worth at 0.2/s is 5 s
    assert counts(settings, tid) == (0, 0)  # refused before the route
    assert client.get("/v1/jobs", headers=auth(other)).status_code == 200


def test_a_deployment_default_rate_applies_to_tenants_without_one(settings, make_tenant):
    from fastapi.testclient import TestClient

    from api.app import create_app

    _, key = make_tenant()
    with TestClient(create_app(settings.model_copy(update={"rate_per_s": 0.1, "rate_burst": 3}))) as c:
        first = c.get("/v1/usage", headers=auth(key))
        assert first.status_code == 200 and first.json()["quotas"]["rate_per_s"] == 0.1
        assert first.json()["quotas"]["rate_burst"] == 3
        assert [c.get("/v1/jobs", headers=auth(key)).status_code for _ in range(3)] == [200, 200, 429]


def test_usage_shows_weight_quotas_queue_and_gpu_seconds(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    set_limits(settings, tid, weight=2.0, max_running=3, max_queued_images=100, rate_per_s=50.0)
    ids = [client.post("/v1/jobs/sample", headers=auth(key), json=sample(model_id, n)).json()["id"] for n in (4, 2)]
    client.post("/v1/jobs/train", headers=auth(key), json={"dataset": "builtin:digits", "steps": 5})
    now = utcnow()
    with session_scope(settings) as s:  # one ran for an hour and ended 10 minutes ago; one runs for 30 min
        done, running = s.get(Job, ids[0]), s.get(Job, ids[1])
        done.status, done.started_at, done.finished_at = "succeeded", now - timedelta(minutes=70), now - timedelta(minutes=10)
        done.outputs_count = 4
        running.status, running.started_at, running.outputs_count = "running", now - timedelta(minutes=30), 1
    u = client.get("/v1/usage", headers=auth(key))
    assert u.status_code == 200, u.text
    body = u.json()
    with session_scope(settings) as s:
        assert body["tenant"] == s.get(Tenant, tid).name
    assert body["weight"] == 2.0
    assert body["quotas"] == {"max_running": 3, "max_queued_images": 100, "rate_per_s": 50.0, "rate_burst": 50}
    assert (body["jobs_running"], body["jobs_queued"], body["images_queued"]) == (1, 1, 1 + 1)
    assert 5400 <= body["gpu_seconds_24h"] <= 5400 + 60  # 3600 + 1800, and the seconds this test took
    assert body["window_s"] == 86400
