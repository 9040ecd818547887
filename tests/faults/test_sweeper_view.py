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
