"""The state machine against real Postgres: conditional UPDATEs, leases, fencing."""

from datetime import timedelta

import pytest
from sqlalchemy import select

from shared import jobstate
from shared.db import session_scope
from shared.jobstate import LeaseLost
from shared.models import Job, JobStatus, utcnow


@pytest.fixture
def job_id(settings, make_tenant):
    tid, _ = make_tenant()
    with session_scope(settings) as s:
        job = Job(tenant_id=tid, type="sample", params={}, max_attempts=2)
        s.add(job)
        s.flush()
        return job.id


def status(settings, job_id):
    with session_scope(settings) as s:
        return s.get(Job, job_id)


def test_claim_once_then_refused_while_lease_held(settings, job_id):
    with session_scope(settings) as s:
        c1 = jobstate.claim(s, job_id, "w1", 30)
    with session_scope(settings) as s:
        c2 = jobstate.claim(s, job_id, "w2", 30)
    assert c1 is not None and c1.attempt == 1
    assert c2 is None
    assert status(settings, job_id).status == "running"


def test_expired_lease_is_reclaimed_and_old_run_is_fenced(settings, job_id):
    with session_scope(settings) as s:
        c1 = jobstate.claim(s, job_id, "w1", 30)
    later = utcnow() + timedelta(seconds=60)
    with session_scope(settings) as s:
        c2 = jobstate.claim(s, job_id, "w2", 30, now=later)
    assert c2.attempt == 2
    with session_scope(settings) as s, pytest.raises(LeaseLost):
        jobstate.set_progress(s, job_id, c1.attempt, 0.5)
    with session_scope(settings) as s, pytest.raises(LeaseLost):
        jobstate.record_output(s, job_id, c1.attempt, row=1, index=0, seed=1, key="k", width=8, height=8, sha256="0")
    with session_scope(settings) as s, pytest.raises(LeaseLost):
        jobstate.finish(s, job_id, c1.attempt, JobStatus.succeeded)
    with session_scope(settings) as s:
        jobstate.finish(s, job_id, c2.attempt, JobStatus.succeeded)
    assert status(settings, job_id).status == "succeeded"


def test_final_state_never_changes(settings, job_id):
    with session_scope(settings) as s:
        c = jobstate.claim(s, job_id, "w1", 30)
        jobstate.finish(s, job_id, c.attempt, JobStatus.failed, error={"code": "x", "message": "y"})
    with session_scope(settings) as s:
        assert jobstate.claim(s, job_id, "w2", 30, now=utcnow() + timedelta(hours=1)) is None
        jobstate.request_cancel(s, job_id)
    assert status(settings, job_id).status == "failed"


def test_outputs_are_recorded_once(settings, job_id):
    with session_scope(settings) as s:
        c = jobstate.claim(s, job_id, "w1", 30)
    args = dict(row=1, index=0, seed=5, key="k", width=8, height=8, sha256="0" * 64)
    with session_scope(settings) as s:
        assert jobstate.record_output(s, job_id, c.attempt, **args) is True
    with session_scope(settings) as s:
        assert jobstate.record_output(s, job_id, c.attempt, **args) is False
    assert status(settings, job_id).outputs_count == 1


def test_a_batch_of_outputs_is_recorded_once_with_row_done_per_completed_row(settings, make_tenant):
    from shared.models import JobEvent, JobRow

    tid, _ = make_tenant()
    with session_scope(settings) as s:
        job = Job(tenant_id=tid, type="sample", params={}, max_attempts=2)
        job.rows = [JobRow(row=1, prompt="a", seed=1, num_images=2), JobRow(row=2, prompt="b", seed=2, num_images=2)]
        s.add(job)
        s.flush()
        jid = job.id
    with session_scope(settings) as s:
        c = jobstate.claim(s, jid, "w1", 30)

    def rec(row, index):
        return dict(row=row, index=index, seed=row, key=f"k/{row}/{index}", width=8, height=8, sha256="0" * 64)

    with session_scope(settings) as s:  # row 1 complete, row 2 half
        assert jobstate.record_outputs(s, jid, c.attempt, [rec(1, 0), rec(1, 1), rec(2, 0)]) == {(1, 0), (1, 1), (2, 0)}
    with session_scope(settings) as s:  # a replayed batch: only the new output counts
        assert jobstate.record_outputs(s, jid, c.attempt, [rec(2, 0), rec(2, 1)]) == {(2, 1)}
    with session_scope(settings) as s:
        done = [e.data["row"] for e in s.scalars(select(JobEvent).where(JobEvent.job_id == jid,
                                                                         JobEvent.type == "row_done")
                                                  .order_by(JobEvent.id))]
    assert done == [1, 2]
    assert status(settings, jid).outputs_count == 4
    with session_scope(settings) as s:  # a fenced-off attempt writes nothing
        with pytest.raises(jobstate.LeaseLost):
            jobstate.record_outputs(s, jid, c.attempt + 1, [rec(3, 0)])


def test_cancel_queued_is_immediate_and_running_is_flagged(settings, job_id, make_tenant):
    with session_scope(settings) as s:
        jobstate.request_cancel(s, job_id)
    assert status(settings, job_id).status == "canceled"
    tid, _ = make_tenant()
    with session_scope(settings) as s:
        j = Job(tenant_id=tid, type="sample", params={})
        s.add(j)
        s.flush()
        jid = j.id
    with session_scope(settings) as s:
        c = jobstate.claim(s, jid, "w", 30)
        jobstate.request_cancel(s, jid)
    with session_scope(settings) as s:
        assert jobstate.heartbeat(s, jid, c.attempt, 30) is True
    assert status(settings, jid).status == "running"


def test_poison_job_fails_after_max_attempts(settings, job_id):
    t = utcnow()
    for i in range(2):
        with session_scope(settings) as s:
            assert jobstate.claim(s, job_id, f"w{i}", 5, now=t + timedelta(seconds=10 * i)) is not None
    with session_scope(settings) as s:
        assert jobstate.claim(s, job_id, "w3", 5, now=t + timedelta(seconds=100)) is None
        failed = jobstate.fail_exhausted(s, now=t + timedelta(seconds=100))
    assert failed == [job_id]
    job = status(settings, job_id)
    assert job.status == "failed" and job.error["code"] == "attempts_exhausted" and job.attempts == 2


def test_release_requeues_without_spending_an_attempt(settings, job_id):
    with session_scope(settings) as s:
        c = jobstate.claim(s, job_id, "w1", 30)
        assert jobstate.release(s, job_id, c.attempt)
    job = status(settings, job_id)
    # The attempt is refunded (max_attempts + 1), never by lowering the fencing token.
    assert job.status == "queued" and job.attempts == 1 and job.max_attempts == 3
    assert job.lease_owner is None and job.lease_expires_at is None
    with session_scope(settings) as s:
        c2 = jobstate.claim(s, job_id, "w2", 30)
    assert c2.attempt == 2  # a token is never handed out twice
    with session_scope(settings) as s, pytest.raises(LeaseLost):
        jobstate.set_progress(s, job_id, c.attempt, 0.5)
    with session_scope(settings) as s:
        assert jobstate.release(s, job_id, c.attempt) is False  # the old run cannot give it back


def test_retry_or_fail_spends_attempts_then_fails(settings, job_id):
    err = {"code": "executor_died", "message": "the job's executor process died (killed by SIGKILL)"}
    with session_scope(settings) as s:
        c1 = jobstate.claim(s, job_id, "w1", 30)
        assert jobstate.retry_or_fail(s, job_id, c1.attempt, err) == "requeued"
    assert status(settings, job_id).status == "queued"
    with session_scope(settings) as s:
        c2 = jobstate.claim(s, job_id, "w1", 30)
        assert jobstate.retry_or_fail(s, job_id, c1.attempt, err) is None  # fenced
        assert jobstate.retry_or_fail(s, job_id, c2.attempt, err) == "failed"
    job = status(settings, job_id)
    assert job.status == "failed" and job.attempts == 2
    assert job.error["code"] == "attempts_exhausted" and "SIGKILL" in job.error["message"]


def test_cancel_requested_is_fenced(settings, job_id):
    with session_scope(settings) as s:
        c = jobstate.claim(s, job_id, "w1", 30)
        assert jobstate.cancel_requested(s, job_id, c.attempt) is False
        jobstate.request_cancel(s, job_id)
        assert jobstate.cancel_requested(s, job_id, c.attempt) is True
    with session_scope(settings) as s, pytest.raises(LeaseLost):
        jobstate.cancel_requested(s, job_id, c.attempt + 1)


def test_sweep_candidates_and_abandoned_cancels(settings, job_id, make_tenant):
    t = utcnow()
    with session_scope(settings) as s:
        assert {c.job_id for c in jobstate.sweep_candidates(s)} >= {job_id}  # queued
        assert jobstate.claim(s, job_id, "w1", 5, now=t) is not None
    with session_scope(settings) as s:
        ids = {c.job_id for c in jobstate.sweep_candidates(s, now=t)}
        assert job_id not in ids  # running under a live lease
        ids = {c.job_id: c.status for c in jobstate.sweep_candidates(s, now=t + timedelta(seconds=10))}
        assert ids[job_id] == "running"  # its worker died: due again
        jobstate.request_cancel(s, job_id)
    with session_scope(settings) as s:
        assert job_id not in {c.job_id for c in jobstate.sweep_candidates(s, now=t + timedelta(seconds=10))}
        assert jobstate.cancel_abandoned(s, now=t + timedelta(seconds=10)) == [job_id]
    assert status(settings, job_id).status == "canceled"


def test_transitions_append_events_in_the_same_transaction(settings, job_id):
    from shared.models import JobEvent, JobRow

    with session_scope(settings) as s:
        s.add(JobRow(job_id=job_id, row=1, prompt="p", seed=1, num_images=2))
    with session_scope(settings) as s:
        c = jobstate.claim(s, job_id, "w1", 30)
        jobstate.set_progress(s, job_id, c.attempt, 0.5, {"step": 1})
        jobstate.set_progress(s, job_id, c.attempt, 0.6, {"step": 2}, event=False)  # the row only
        for i in range(2):
            jobstate.record_output(s, job_id, c.attempt, row=1, index=i, seed=1 + i, key=f"k{i}", width=8, height=8,
                                   sha256="0" * 64)
        jobstate.finish(s, job_id, c.attempt, JobStatus.succeeded)
    # A refused (fenced-off) write leaves no event behind.
    with session_scope(settings) as s, pytest.raises(LeaseLost):
        jobstate.set_progress(s, job_id, c.attempt, 0.9)
    with session_scope(settings) as s:
        types = [e.type for e in s.query(JobEvent).filter_by(job_id=job_id).order_by(JobEvent.id)]
    assert types == ["started", "progress", "row_done", "succeeded"]


def test_progress_events_at_most_one_a_interval_per_job_but_forced_ones_always():
    now = [100.0]
    events = jobstate.ProgressEvents(1.0, clock=lambda: now[0])
    seen = []
    for i in range(30):  # 0.1 s apart: 3 s of reports of two jobs
        now[0] = 100.0 + i / 10
        seen += [(job, i) for job in ("a", "b") if events.due(job, force=job == "b" and i == 29)]
    assert [i for j, i in seen if j == "a"] == [0, 10, 20]
    assert [i for j, i in seen if j == "b"] == [0, 10, 20, 29]  # the forced (last) report too
    for k in range(300):  # many jobs over a writer's life: the state is pruned, the rule unchanged
        now[0] += 2
        assert events.due(f"j{k}")
    assert len(events._last) <= 257 and not events.due("j299")
    assert jobstate.ProgressEvents(0).due("x") and jobstate.ProgressEvents(0).due("x")
