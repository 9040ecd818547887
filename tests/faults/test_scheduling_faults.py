"""Claims by policy with real processes: a message only wakes a worker, which takes the best ready
job: another tenant's small job goes ahead of a flood, a higher priority ahead of older work."""

from __future__ import annotations

import pytest

from shared.db import session_scope
from shared.registry import register_pipeline_dir
from shared.storage import get_storage

pytestmark = pytest.mark.slow

ONE_JOB_PER_RUN = {"LDMQ_COBATCH_MAX_ITEMS": "0"}  # no packing: each job is a run of its own


def started_order(fstack, ids: list[str]) -> list[str]:
    """The jobs in the order their first run started."""
    return sorted(ids, key=lambda j: fstack.job(j).started_at)


def test_a_small_job_of_another_tenant_starts_before_a_flood_drains(fstack, settings, make_tenant,
                                                                     tiny_pipeline_dir):
    other_tid, other_key = make_tenant()
    with session_scope(settings) as s:
        model = register_pipeline_dir(s, get_storage(settings), other_tid, tiny_pipeline_dir, name="tiny")
    fstack.start_api()
    fstack.start_worker("w1", extra_env=ONE_JOB_PER_RUN)
    flood = [fstack.submit_sample(60, steps=8) for _ in range(6)]  # tenant A: six jobs, in this order
    fstack.wait_status(flood[0], lambda j: j.status == "running", 60, "the flood's first job to run")
    r = fstack.http.post("/v1/jobs/sample", headers={"Authorization": f"Bearer {other_key}"}, json={
        "model": model.id, "steps": 4, "scheduler": "ddim", "prompts": [{"prompt": "small", "seed": 7}]})
    assert r.status_code == 202, r.text
    small = r.json()["id"]
    # Its message is the seventh in the broker, but the next wake-up (the flood's second message)
    # takes it: tenant B has used nothing, tenant A one job's time.
    assert fstack.wait_final(small, 120).status == "succeeded"
    still_queued = [j for j in flood if fstack.job(j).status == "queued"]
    assert len(still_queued) >= 3, "the small job waited for the flood"
    # The flood's second job starts after it; the rest of the flood is canceled, not waited for
    # (it only repeated the first jobs' runs: 40 s of the CI's half-hour).
    fstack.wait_status(flood[1], lambda j: j.started_at is not None, 120, "the flood's second job to start")
    for j in flood[2:]:
        assert fstack.http.post(f"/v1/jobs/{j}/cancel").status_code in (200, 202)
    for j in flood[:2]:
        assert fstack.wait_final(j, 180).status == "succeeded"
    order = started_order(fstack, flood[:2] + [small])
    assert order == [flood[0], small, flood[1]], order  # right after the job that was running when it came
    assert all(fstack.job(j).attempts == 1 for j in flood[:2] + [small])


def test_within_a_tenant_higher_priority_runs_first_and_the_queue_shows_it(fstack):
    fstack.start_api()
    fstack.start_worker("w1", extra_env=ONE_JOB_PER_RUN)
    first = fstack.submit_sample(60, steps=8)
    fstack.wait_status(first, lambda j: j.status == "running", 60, "the first job to run")
    normal = [fstack.submit_sample(2, steps=4) for _ in range(3)]
    urgent = fstack.submit_sample(2, steps=4, priority=5)
    q = fstack.http.get(f"/v1/jobs/{urgent}").json()["queue"]
    assert q["jobs_ahead"] == 0 and q["workers"] == 1
    assert fstack.http.get(f"/v1/jobs/{normal[2]}").json()["queue"]["jobs_ahead"] == 3
    for j in [first, *normal, urgent]:
        assert fstack.wait_final(j, 180).status == "succeeded"
    assert started_order(fstack, [first, *normal, urgent]) == [first, urgent, *normal]
