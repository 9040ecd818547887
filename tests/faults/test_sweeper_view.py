"""The sweeper's view of the broker, against real Redis and real Celery messages (no worker)."""

from __future__ import annotations

import json
import time
import uuid

from shared.db import session_scope
from shared.models import Job, utcnow
from shared.queue import enqueue
from shared.processes.sweeper import broker_view, sweep_once
from tests.faults.conftest import redis_client


def make_job(settings, tenant_id: str, **fields) -> str:
    with session_scope(settings) as s:
        job = Job(tenant_id=tenant_id, type="sample", params={}, max_attempts=3, **fields)
        s.add(job)
        s.flush()
        return job.id


def test_broker_view_reads_queues_and_unacked(settings):
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    enqueue(a, "sample", settings)
    enqueue(b, "train", settings)
    view = broker_view(settings)
    assert {a, b} <= view.waiting and not view.unacked
    # What a worker holds between delivery and ack: kombu's unacked hash and index.
    r = redis_client(settings)
    raw = r.rpop("sample")
    r.hset("unacked", "tag-1", json.dumps([json.loads(raw), "sample", "sample"]))
    r.zadd("unacked_index", {"tag-1": time.time()})
    view = broker_view(settings)
    assert a not in view.waiting and a in view.unacked and b in view.waiting


def test_sweep_re_enqueues_only_what_no_broker_holds(settings, make_tenant):
    tid, _ = make_tenant()
    old = utcnow().replace(year=2000)
    held = make_job(settings, tid, enqueued_at=old)
    lost = make_job(settings, tid, enqueued_at=old)
    fresh = make_job(settings, tid, enqueued_at=utcnow())  # just submitted: its message may be in flight
    enqueue(held, "sample", settings)
    result = sweep_once(settings)
    assert lost in result["requeued"]
    assert held not in result["requeued"] and fresh not in result["requeued"]
    assert lost in broker_view(settings).waiting
    # The next pass sees the message it sent and sends nothing twice.
    assert lost not in sweep_once(settings)["requeued"]


def test_any_waiting_message_of_the_queue_counts_as_a_wake_up(settings, make_tenant):
    """A worker claims the best job, not the one its message names: a message naming a job that
    already runs still wakes a worker for a queued one, so nothing is sent for it."""
    from datetime import timedelta

    from shared import jobstate

    tid, _ = make_tenant()
    old = utcnow() - timedelta(hours=1)
    taken = make_job(settings, tid, enqueued_at=old)
    waiting = make_job(settings, tid, enqueued_at=old)
    with session_scope(settings) as s:
        assert jobstate.claim(s, taken, "w", 60) is not None  # claimed through another message
    enqueue(taken, "sample", settings)  # its own message is still in the broker
    assert waiting not in sweep_once(settings)["requeued"]
    redis_client(settings).delete("sample")  # now no message can wake a worker for it
    assert sweep_once(settings)["requeued"] == [waiting]


def test_a_tenant_at_max_running_gets_wake_ups_for_its_free_slots_only(settings, make_tenant):
    from datetime import timedelta

    from sqlalchemy import update

    from shared import jobstate
    from shared.models import JobStatus, Tenant

    tid, _ = make_tenant()
    with session_scope(settings) as s:
        s.execute(update(Tenant).where(Tenant.id == tid).values(max_running=2))
    old = utcnow() - timedelta(hours=1)
    running = make_job(settings, tid, enqueued_at=old)
    queued = [make_job(settings, tid, enqueued_at=old) for _ in range(3)]
    with session_scope(settings) as s:
        c = jobstate.claim(s, running, "w", 60)
    assert sweep_once(settings)["requeued"] == [queued[0]]  # one free slot: one wake-up
    assert sweep_once(settings)["requeued"] == []  # and not again while it waits
    with session_scope(settings) as s:
        jobstate.finish(s, running, c.attempt, JobStatus.succeeded)
        jobstate.mark_enqueued(s, [queued[0]], now=old)  # as if its message had been lost
    redis_client(settings).delete("sample")
    assert sweep_once(settings)["requeued"] == queued[:2]
