"""A queued job's ``queue`` (work ahead and an estimated start), over HTTP, with no worker running."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import update

from shared.db import session_scope
from shared.models import Tenant
from tests.conftest import cancel_unfinished_jobs


def auth(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(autouse=True)
def empty_queue(settings):
    """Other tenants' queued work counts ahead: start with none left by earlier tests."""
    cancel_unfinished_jobs(settings.database_url)
    yield


def submit(client, key, model, images: int, priority: int = 0) -> str:
    r = client.post("/v1/jobs/sample", headers=auth(key), json={
        "model": model, "steps": 2, "priority": priority,
        "prompts": [{"prompt": "p", "seed": 1, "num_images": images}]})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def queue(client, key, job_id) -> dict:
    r = client.get(f"/v1/jobs/{job_id}", headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()["queue"]


def test_work_ahead_follows_priority_and_fair_share(client, settings, tiny_model, make_tenant):
    tid, key, model = tiny_model
    first = submit(client, key, model, 3)
    second = submit(client, key, model, 5)
    assert queue(client, key, first)["jobs_ahead"] == 0
    q = queue(client, key, second)
    assert (q["jobs_ahead"], q["images_ahead"], q["exact"], q["workers"]) == (1, 3, True, 0)
    # Nothing runs: one worker assumed, sched_seconds_per_image (2 s) per image ahead.
    eta = datetime.fromisoformat(q["estimated_start_at"])
    now = datetime.fromisoformat(client.get(f"/v1/jobs/{second}", headers=auth(key)).json()["created_at"])
    assert 3 * settings.sched_seconds_per_image - 1 < (eta - now).total_seconds() < 3 * settings.sched_seconds_per_image + 30
    urgent = submit(client, key, model, 2, priority=5)  # jumps both
    assert queue(client, key, urgent)["jobs_ahead"] == 0
    assert queue(client, key, second)["images_ahead"] == 3 + 2
    with session_scope(settings) as s:
        name = s.get(Tenant, tid).name
    metrics = client.get("/metrics").text  # what the scheduler holds back, by tenant and priority
    assert f'ldmq_jobs_queued{{priority="5",tenant="{name}",type="sample"}} 1.0' in metrics
    assert f'ldmq_jobs_queued{{priority="0",tenant="{name}",type="sample"}} 2.0' in metrics
    assert f'ldmq_queue_oldest_wait_seconds{{priority="0",tenant="{name}",type="sample"}}' in metrics

    # Another tenant with queued work shares the workers by weight: with weight 2 it gets two
    # images for each of ours that comes first, at most what it has queued.
    other_tid, other_key = make_tenant()
    with session_scope(settings) as s:
        s.execute(update(Tenant).where(Tenant.id == other_tid).values(weight=2.0))
    from shared.models import Job

    with session_scope(settings) as s:  # its jobs use our model id only as a label: nothing runs here
        for _ in range(3):
            s.add(Job(tenant_id=other_tid, type="sample", params={}, total_items=10))
    q = queue(client, key, second)
    # Ours ahead: 3 + 2 images; with the job's own 5 that is 10 → 20 of the other tenant's 30.
    assert q["images_ahead"] == 5 + 20 and q["jobs_ahead"] == 2 + 2


def test_a_running_or_final_job_has_no_queue(client, settings, tiny_model):
    _, key, model = tiny_model
    job_id = submit(client, key, model, 1)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 200
    assert queue(client, key, job_id) is None
    assert client.get("/v1/jobs", headers=auth(key)).json()["items"][0]["queue"] is None
