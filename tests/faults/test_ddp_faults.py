"""A train job on two gloo ranks (``LDMQ_TRAIN_DEVICES=2``) through the real worker: cancel stops
every rank, and a rank killed mid-run spends the attempt; the next attempt resumes from the last
checkpoint on two ranks again and finishes."""

from __future__ import annotations

import os
import re
import signal

import pytest

from tests.conftest import wait_until
from tests.faults.conftest import TRAIN, checkpoint_step, steps_of_attempt

pytestmark = pytest.mark.slow

TWO_RANKS = {"LDMQ_TRAIN_DEVICES": "2", "LDMQ_WORKER_THREADS": "1"}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def rank_pids(worker) -> list[int]:
    """The rank processes the worker's runs started, in order (worker.model.distributed logs them)."""
    return [int(p) for p in re.findall(r"training on 2 ranks \(gloo[^)]*\): rank pids \[(\d+)\]", worker.output())]


def test_cancel_stops_both_ranks(fstack):
    fstack.start_api()
    w = fstack.start_worker("w1", extra_env=TWO_RANKS)
    job_id = fstack.submit_train(**TRAIN)
    fstack.wait_status(job_id, lambda j: checkpoint_step(j.checkpoint_key) >= 20, 240, "a checkpoint in the U-Net stage")
    [rank1] = rank_pids(w)
    assert alive(rank1)
    r = fstack.http.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code in (200, 202), r.text
    assert fstack.wait_final(job_id, 60).status == "canceled"
    wait_until(lambda: not alive(rank1), 30, "rank 1 to end with the run")
    assert "rank 1 failed" not in w.output()  # it stopped at rank 0's step (else it would fail or hang)
    assert w.alive() and w.executor_pid() is not None


def test_a_killed_rank_spends_the_attempt_and_the_job_resumes_on_two_ranks(fstack):
    fstack.start_api()
    w = fstack.start_worker("w1", extra_env=TWO_RANKS)
    job_id = fstack.submit_train(**TRAIN)
    job = fstack.wait_status(job_id, lambda j: checkpoint_step(j.checkpoint_key) >= 20, 240,
                             "a checkpoint in the U-Net stage")
    [rank1] = rank_pids(w)
    executor = w.executor_pid()
    os.kill(rank1, signal.SIGKILL)  # rank 0's next collective fails: the attempt ends
    k = checkpoint_step(fstack.job(job_id).checkpoint_key)
    assert k >= checkpoint_step(job.checkpoint_key)
    job = fstack.wait_final(job_id, 300)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2 and job.model_id
    requeued = [d for t, d in fstack.events(job_id) if t == "requeued"]
    assert [d["reason"] for d in requeued] == ["rank_died"], requeued
    assert "training rank 1 of 2 failed" in requeued[0]["error"]["message"]
    assert "/" not in requeued[0]["error"]["message"]  # no paths, no traceback for the tenant
    resumed = steps_of_attempt(fstack.events(job_id), 2)
    assert resumed and min(resumed) > k and max(resumed) == 90
    assert w.executor_pid() == executor  # rank 0's process lived on: only the attempt was spent
    second = rank_pids(w)[1]
    wait_until(lambda: not alive(second), 30, "the second run's rank to end")
    model = fstack.http.get(f"/v1/models/{job.model_id}").json()
    assert model["metrics"]["train_world_size"] == 2


def test_sigterm_to_the_whole_worker_group_checkpoints_on_two_ranks_and_requeues(fstack):
    """SIGTERM reaches the worker, its executor (rank 0) and rank 1 at once (the process group, as
    `docker stop` or Ctrl-C would): rank 1 ignores it and stops at the step rank 0 broadcasts, so the
    job is released (not crashed) with the checkpoint of that step."""
    fstack.start_api()
    w = fstack.start_worker("w1", extra_env=TWO_RANKS)
    job_id = fstack.submit_train(**TRAIN)
    fstack.wait_status(job_id, lambda j: checkpoint_step(j.checkpoint_key) >= 20, 240, "a checkpoint in the U-Net stage")
    [rank1] = rank_pids(w)
    seen = max(steps_of_attempt(fstack.events(job_id), 1))
    w.signal(signal.SIGTERM)
    assert w.wait_exit(60) == 0  # a warm shutdown
    wait_until(lambda: not alive(rank1), 30, "rank 1 to end with the run")
    events = fstack.events(job_id)
    assert [d["reason"] for t, d in events if t == "requeued"] == ["worker shutdown"]
    k = max(checkpoint_step(d["key"]) for t, d in events if t == "checkpoint" and d["attempt"] == 1)
    assert k >= seen  # it checkpointed where it stopped
    assert "rank 1 failed" not in w.output()
    job = fstack.job(job_id)
    assert job.status == "queued" and job.attempts == 1
