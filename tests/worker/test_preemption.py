"""The worker's side of preemption (worker/runtime/preemption.py, JobRun's stop reasons): the
policy asked at heartbeat pace and only for train runs, the answer withdrawn when it turns, the
outcome annotated, and "preempt" never stopping a run between steps."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared import jobstate
from shared.db import session_scope
from shared.models import Job, utcnow
from tests.conftest import cancel_unfinished_jobs
from worker.runtime.errors import JobPreempted, JobTimeout
from worker.runtime.outcome import Outcome, classify
from worker.runtime.preemption import PreemptionWatch
from worker.runtime.run import JobRun


@pytest.fixture(autouse=True)
def empty_queue(settings):
    cancel_unfinished_jobs(settings.database_url)
    yield


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def queued_train(settings, tenant_id: str, priority: int = 0, age_s: float = 0.0) -> str:
    with session_scope(settings) as s:
        job = Job(tenant_id=tenant_id, type="train", params={}, priority=priority,
                  created_at=utcnow() - timedelta(seconds=age_s))
        s.add(job)
        s.flush()
        return job.id


def test_asked_at_heartbeat_pace_withdrawn_when_the_waiting_job_is_taken(settings, make_tenant):
    on = settings.model_copy(update={"preempt_after_s": 5.0, "heartbeat_seconds": 2.0})
    tid, _ = make_tenant()
    running = queued_train(on, tid)
    with session_scope(on) as s:
        claim = jobstate.claim_next(s, on, "train", "w", 30)
    assert claim.job_id == running
    urgent = queued_train(on, tid, priority=5, age_s=60)
    clock = Clock()
    watch = PreemptionWatch(on, running, claim.attempt, "train", clock=clock)
    assert watch.poll() is None  # no query before a heartbeat's time
    clock.t += 2.0
    assert watch.poll() is None  # queried: the run has not run 5 s yet
    clock.t += 4.0
    decision = watch.poll()
    assert (decision.waiting_job_id, decision.reason) == (urgent, "priority")
    clock.t += 1.0
    assert watch.poll() is decision  # cached until the next heartbeat
    # Another worker takes the waiting job before our checkpoint comes: the answer is withdrawn.
    with session_scope(on) as s:
        assert jobstate.claim_next(s, on, "train", "w2", 30).job_id == urgent
    clock.t += 2.0
    assert watch.poll() is None and watch.decision is None


def test_off_or_a_sample_run_never_asks(settings):
    assert not PreemptionWatch(settings, "j", 1, "train").enabled  # off by default
    on = settings.model_copy(update={"preempt_after_s": 5.0})
    assert not PreemptionWatch(on, "j", 1, "sample").enabled
    assert PreemptionWatch(on, "j", 1, "train").enabled


def test_the_outcome_of_a_yield_names_what_it_yielded_to(settings):
    from shared.scheduler import Preemption

    watch = PreemptionWatch(settings.model_copy(update={"preempt_after_s": 5.0}), "j", 1, "train")
    watch.decision = Preemption("w", "fair_share", 12.34)
    out = watch.annotate(classify(JobPreempted("j")))
    assert (out.kind, out.reason) == ("released", "preempted")
    assert out.extra["preempted"] == {"reason": "fair_share", "waiting_job": "w", "waited_s": 12.3}
    shutdown = watch.annotate(Outcome("released", reason="worker shutdown"))
    assert "preempted" not in shutdown.extra  # a shutdown is not a preemption


def test_preempt_stops_a_run_only_at_a_checkpoint_and_never_hides_a_stronger_reason(settings):
    word = {"reason": "preempt"}
    claim = jobstate.Claim("j", 1, utcnow())
    run = JobRun(settings, claim, "train", "w", heartbeat=False, external_stop=lambda: word["reason"])
    run.check()  # between steps: goes on
    assert run.yield_requested()
    with pytest.raises(JobPreempted):
        run.check(at_checkpoint=True)
    run.deadline = 0.0  # past the time limit: that wins
    assert run.stop_reason() == "timeout" and not run.yield_requested()
    with pytest.raises(JobTimeout):
        run.check()
    word["reason"] = None  # withdrawn
    run.deadline = float("inf")
    run.check(at_checkpoint=True)
    assert not run.yield_requested()
