"""Stopping a run on purpose: time limits (soft, then hard), SIGTERM, cancel."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import wait_until
from tests.faults.conftest import TRAIN, checkpoint_step, steps_of_attempt, wait_dead

pytestmark = pytest.mark.slow

WHOLE = {"LDMQ_SAMPLE_PIECE_IMAGES": "0"}  # jobs are not split into pieces (tests/faults/test_piece_faults.py)


def test_7_time_limits_end_in_failed_and_the_worker_keeps_serving(fstack):
    limit, grace = 6, 2
    fstack.start_api(WHOLE)  # a time limit is per run: these 400-image jobs must run as one
    w = fstack.start_worker("w1", extra_env={"LDMQ_SAMPLE_TIME_LIMIT_S": str(limit),
                                             "LDMQ_STOP_GRACE_S": str(grace)})
    worker_pid = w.p.pid
    # Soft limit: the run is asked to stop and does so between denoising steps.
    soft = fstack.submit_sample(400, steps=8)
    job = fstack.wait_final(soft, 90)
    assert job.status == "failed" and job.error["code"] == "timeout", job.error
    assert f"time limit of {limit} s" in job.error["message"] and 0 < job.outputs_count < 400
    # Hard limit: a run stuck inside a step (its process stopped) ignores the request; it is killed.
    hard = fstack.submit_sample(400, steps=8)
    fstack.wait_status(hard, lambda j: j.outputs_count >= 1, 60, "the second job to make outputs")
    stuck = w.executor_pid()
    os.kill(stuck, signal.SIGSTOP)
    t0 = time.monotonic()
    job = fstack.wait_final(hard, 60)
    assert job.status == "failed" and job.error["code"] == "timeout", job.error
    assert "hard time limit" in job.error["message"] and "killed" in job.error["message"]
    assert time.monotonic() - t0 < limit + grace + 5
    wait_dead(stuck)  # killed, GPU memory and all
    # The worker keeps serving, with a fresh executor.
    ok = fstack.submit_sample(2, steps=2)
    assert fstack.wait_final(ok, 90).status == "succeeded"
    assert w.alive() and w.p.pid == worker_pid and w.executor_pid() not in (None, stuck)


def test_cancel_reaches_a_running_job_within_seconds(fstack):
    fstack.start_api()
    w = fstack.start_worker("w1")
    job_id = fstack.submit_sample(400, steps=8)
    fstack.wait_status(job_id, lambda j: j.outputs_count >= 2, 60, "outputs")
    t0 = time.monotonic()
    r = fstack.http.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code in (200, 202), r.text
    job = fstack.wait_final(job_id, 30)
    assert job.status == "canceled" and time.monotonic() - t0 < 5
    n = job.outputs_count
    assert 0 < n < 400
    ok = fstack.submit_sample(1, steps=2)
    assert fstack.wait_final(ok, 60).status == "succeeded"
    assert fstack.job(job_id).outputs_count == n and w.alive()


@pytest.mark.parametrize("concurrency", [1, 2], ids=["solo", "two-at-once"])
def test_8_sigterm_mid_training_checkpoints_requeues_at_once_and_resumes(fstack, concurrency):
    """Also with ``--concurrency 2`` (a thread pool supervising two executors)."""
    fstack.start_api()
    # Two workers: the first gets the job and is stopped, the other takes over (it warms up meanwhile).
    fstack.start_worker("w1", concurrency=concurrency)
    job_id = fstack.submit_train(**TRAIN)
    fstack.start_worker("w2", ready=False)
    fstack.wait_status(job_id, lambda j: checkpoint_step(j.checkpoint_key) >= 20, 180,
                       "a checkpoint in the U-Net stage", interval=0.05)
    w1 = fstack.owner_of(job_id)
    w2 = next(p for p in fstack.procs if p is not w1 and getattr(p, "name", "").startswith("worker-w"))
    seen = max(steps_of_attempt(fstack.events(job_id), 1))
    t0 = time.monotonic()
    w1.signal(signal.SIGTERM)
    # The release is seen through its event (the standby worker may claim the job again at once).
    wait_until(lambda: any(t == "requeued" for t, _ in fstack.events(job_id)), 30, "the job to be released",
               interval=0.05)
    released_after = time.monotonic() - t0
    assert released_after < 10, released_after
    assert w1.wait_exit(30) == 0  # a warm shutdown, not a kill
    events = fstack.events(job_id)
    requeued = [d for t, d in events if t == "requeued"]
    assert requeued == [{"reason": "worker shutdown", "attempt": 1}]
    k = max(d["key"] and checkpoint_step(d["key"]) for t, d in events if t == "checkpoint" and d["attempt"] == 1)
    assert k >= seen  # it checkpointed where it stopped, not at the last periodic checkpoint
    job = fstack.wait_final(job_id, 180)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2 and job.max_attempts == 4  # the shutdown did not spend an attempt
    resumed = steps_of_attempt(fstack.events(job_id), 2)
    assert resumed and min(resumed) > k
    assert f"job {job_id}: attempt 2 claimed" in w2.output()


def test_concurrency_two_runs_two_jobs_at_once_each_in_its_own_executor(fstack):
    fstack.start_api(WHOLE)  # two jobs, not pieces of them
    fstack.start_worker("w1", concurrency=2, extra_env={"LDMQ_COBATCH_MAX_ITEMS": "0"})  # no packing
    jobs = [fstack.submit_sample(200, steps=8) for _ in range(2)]

    def both_running():
        js = [fstack.job(j) for j in jobs]
        return js if all(j.status == "running" and j.outputs_count >= 1 for j in js) else None

    running = wait_until(both_running, 90, "both jobs to be making images at once", interval=0.05)
    owners = {j.lease_owner for j in running}
    assert len(owners) == 2  # two task threads of one worker process
    assert len({o.split(":")[1] for o in owners}) == 1
    for j in jobs:
        r = fstack.http.post(f"/v1/jobs/{j}/cancel")
        assert r.status_code in (200, 202), r.text
    assert {fstack.wait_final(j, 30).status for j in jobs} == {"canceled"}
