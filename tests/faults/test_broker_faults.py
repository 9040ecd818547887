"""The broker is only a wake-up call: losing every message, or delivering one twice, changes nothing."""

from __future__ import annotations

import json

import pytest

from tests.faults.conftest import redis_client

pytestmark = pytest.mark.slow


def test_1_flushall_every_job_still_finishes(fstack, settings):
    """Submit, then FLUSHALL Redis (a server of the fault tests' own): the sweeper sees queued jobs
    that no broker holds and re-enqueues them; the job running during the flush finishes too.
    Nothing runs twice."""
    fstack.start_api()
    fstack.start_worker("w1")
    ids = [fstack.submit_sample(5, steps=4) for _ in range(4)]
    fstack.wait_status(ids[0], lambda j: j.status == "running", 60, "the first job to run")
    r = redis_client(settings)
    assert r.llen("sample") >= 1  # the others wait in the broker
    if r.connection_pool.connection_kwargs.get("db", 0) == 0:
        r.flushall()
    else:  # the shared server's fallback database: leave the others alone
        r.flushdb()
    assert r.llen("sample") == 0 and r.hlen("unacked") == 0
    fstack.start_sweeper()
    for job_id in ids:
        job = fstack.wait_final(job_id, 120)
        assert job.status == "succeeded", job.error
        assert job.attempts == 1
        fstack.assert_outputs_exactly_once(job_id, 5)
    assert sum(t == "started" for job_id in ids for t, _ in fstack.events(job_id)) == 4


def test_2_same_message_to_two_workers_runs_once(fstack, settings):
    """The same Celery message, delivered to two idle workers at once: one claims and runs the
    job, the other finds it taken and does nothing; one set of outputs."""
    fstack.start_api()
    job_id = fstack.submit_sample(6, steps=4)  # no worker yet: the message waits in Redis
    r = redis_client(settings)
    raw = r.lrange("sample", 0, -1)
    assert len(raw) == 1 and json.loads(raw[0])["headers"]["argsrepr"] == repr([job_id])
    r.delete("sample")
    w1, w2 = fstack.start_worker("w1"), fstack.start_worker("w2")
    r.lpush("sample", raw[0], raw[0])  # two identical deliveries, to two idle workers
    job = fstack.wait_final(job_id, 120)
    assert job.status == "succeeded" and job.attempts == 1
    fstack.assert_outputs_exactly_once(job_id, 6)
    assert [t for t, _ in fstack.events(job_id)].count("started") == 1
    task_id = json.loads(raw[0])["headers"]["id"]
    for w in (w1, w2):  # each worker received the message once ...
        assert w.output().count(f"[{task_id}] received") == 1, w.output()[-3000:]
    logs = w1.output() + w2.output()
    assert logs.count(f"job {job_id}: not claimable") == 1  # ... and exactly one of them ran it
    assert r.llen("sample") == 0
