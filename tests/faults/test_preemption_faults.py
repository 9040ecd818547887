"""Preemption at checkpoints with real processes: one worker, one slot, a long training running;
the tenant's urgent training job waits ``LDMQ_PREEMPT_AFTER_S``, the long one yields at its next
periodic checkpoint (released as by SIGTERM, the attempt refunded), the urgent one runs, then the
long one resumes from that checkpoint. With the setting off, nothing is preempted."""

from __future__ import annotations

import pytest

from shared.db import session_scope
from shared.models import JobEvent
from tests.faults.conftest import TRAIN, checkpoint_step, steps_of_attempt

pytestmark = pytest.mark.slow

PREEMPT = {"LDMQ_PREEMPT_AFTER_S": "1"}
LONG = {**TRAIN, "steps": 150}  # ~160 global steps, a checkpoint every 10
SHORT = {**TRAIN, "steps": 20, "autoencoder_steps": 10}


def timed_events(settings, job_id: str) -> list[tuple[str, dict, object]]:
    with session_scope(settings) as s:
        return [(e.type, e.data, e.created_at)
                for e in s.query(JobEvent).filter_by(job_id=job_id).order_by(JobEvent.id)]


def started_at(settings, job_id: str, attempt: int):
    return next(t for typ, d, t in timed_events(settings, job_id) if typ == "started" and d["attempt"] == attempt)


def test_a_long_training_yields_at_its_next_checkpoint_to_the_tenants_urgent_job_and_resumes(fstack, settings):
    fstack.start_api()
    fstack.start_worker("w1", queues="train", extra_env=PREEMPT)
    long = fstack.submit_train(**LONG)
    fstack.wait_status(long, lambda j: checkpoint_step(j.checkpoint_key) >= 20, 180,
                       "a checkpoint in the U-Net stage", interval=0.05)
    urgent = fstack.submit_train(**SHORT, priority=5)

    def preempted():
        return [d for t, d in fstack.events(long) if t == "preempted"]

    from tests.conftest import wait_until

    [event] = wait_until(preempted, 120, "the long job to be preempted", interval=0.1)
    assert event["reason"] == "priority" and event["waiting_job"] == urgent and event["attempt"] == 1
    assert event["waited_s"] >= 1
    events = fstack.events(long)
    k = max(checkpoint_step(d["key"]) for t, d in events if t == "checkpoint" and d["attempt"] == 1)
    assert k % LONG["checkpoint_every"] == 0 and k < 160  # a periodic checkpoint, mid-training
    assert max(steps_of_attempt(events, 1)) <= k  # it stopped at that checkpoint: no step after it lost
    assert [d for t, d in events if t == "requeued"] == [{"reason": "preempted", "attempt": 1}]

    done = fstack.wait_final(urgent, 180)
    assert done.status == "succeeded", done.error
    assert done.attempts == 1
    job = fstack.wait_final(long, 300)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2 and job.max_attempts == 4  # the preemption did not spend an attempt
    assert started_at(settings, long, 2) >= done.finished_at  # the slot went to the urgent job first
    resumed = steps_of_attempt(fstack.events(long), 2)
    assert resumed and min(resumed) > k  # resumed from the checkpoint, not from step 0
    assert len(preempted()) == 1  # once: nothing waited after the urgent job


def test_an_under_served_tenants_job_preempts_another_tenants_long_training(fstack, settings, make_tenant):
    _, other_key = make_tenant()
    fstack.start_api()
    fstack.start_worker("w1", queues="train", extra_env=PREEMPT)
    long = fstack.submit_train(**LONG)
    fstack.wait_status(long, lambda j: checkpoint_step(j.checkpoint_key) >= 20, 180,
                       "a checkpoint in the U-Net stage", interval=0.05)
    r = fstack.http.post("/v1/jobs/train", headers={"Authorization": f"Bearer {other_key}"},
                         json={"dataset": "builtin:digits", **SHORT})  # no priority: fair share alone
    assert r.status_code == 202, r.text
    small = r.json()["id"]
    done = fstack.wait_final(small, 180)
    assert done.status == "succeeded" and done.attempts == 1
    [event] = [d for t, d in fstack.events(long) if t == "preempted"]
    assert event["reason"] == "fair_share" and event["waiting_job"] == small
    job = fstack.wait_final(long, 300)
    assert job.status == "succeeded" and job.attempts == 2 and job.max_attempts == 4
    assert started_at(settings, long, 2) >= done.finished_at


def test_with_the_setting_off_nothing_is_preempted(fstack, settings):
    fstack.start_api()
    fstack.start_worker("w1", queues="train")
    long = fstack.submit_train(**{**SHORT, "steps": 40})
    fstack.wait_status(long, lambda j: checkpoint_step(j.checkpoint_key) >= 20, 180,
                       "a checkpoint in the U-Net stage", interval=0.05)
    urgent = fstack.submit_train(**SHORT, priority=5)
    job = fstack.wait_final(long, 180)
    assert job.status == "succeeded" and job.attempts == 1
    assert not [t for t, _ in fstack.events(long) if t in ("preempted", "requeued")]
    done = fstack.wait_final(urgent, 180)
    assert done.status == "succeeded"
    assert started_at(settings, urgent, 1) >= job.finished_at
