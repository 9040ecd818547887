"""Workers die (SIGKILL), freeze (SIGSTOP) or keep dying: jobs finish once, stale runs write nothing,
and a job that kills its worker every time ends ``failed`` instead of looping forever."""

from __future__ import annotations

import re
import signal

import pytest

from tests.conftest import wait_until
from tests.faults.conftest import TRAIN, checkpoint_step, redis_client, steps_of_attempt, wait_dead

pytestmark = pytest.mark.slow

def test_3_sigkill_mid_sample_every_row_exactly_once(fstack):
    fstack.start_api()
    fstack.start_sweeper()
    # Two workers (the second one warms up meanwhile, and stands for the restarted worker).
    fstack.start_worker("w1", ready=False)
    fstack.start_worker("w2", ready=False)
    job_id = fstack.submit_sample(40, steps=8)
    fstack.wait_status(job_id, lambda j: 3 <= j.outputs_count < 40, 120, "some of the outputs")
    victim = fstack.owner_of(job_id)
    victim.signal(signal.SIGKILL)  # the whole process group: the worker and its executor
    victim.wait_exit(10)
    before = fstack.job(job_id)
    assert before.status == "running" and 0 < before.outputs_count < 40
    job = fstack.wait_final(job_id, 120)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    fstack.assert_outputs_exactly_once(job_id, 40)
    by_attempt = {a: sum(o.attempt == a for o in fstack.outputs(job_id)) for a in (1, 2)}
    assert by_attempt[1] >= before.outputs_count and by_attempt[1] + by_attempt[2] == 40


def test_4_sigkill_mid_training_resumes_from_checkpoint(fstack):
    fstack.start_api()
    fstack.start_sweeper()
    fstack.start_worker("w1", ready=False)
    fstack.start_worker("w2", ready=False)
    job_id = fstack.submit_train(**TRAIN)
    job = fstack.wait_status(job_id, lambda j: checkpoint_step(j.checkpoint_key) >= 20, 180,
                             "a checkpoint in the U-Net stage", interval=0.02)
    victim = fstack.owner_of(job_id)
    victim.signal(signal.SIGKILL)
    victim.wait_exit(10)
    k = checkpoint_step(fstack.job(job_id).checkpoint_key)  # the last checkpoint before the kill
    assert k >= checkpoint_step(job.checkpoint_key) and k < 90
    job = fstack.wait_final(job_id, 180)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2 and job.model_id
    resumed = steps_of_attempt(fstack.events(job_id), 2)
    assert resumed and min(resumed) > k, (k, resumed)  # resumed at step k, not from scratch
    assert max(resumed) == 90


def test_5_sigstop_past_the_lease_then_sigcont_stale_writes_are_refused(fstack):
    fstack.start_api()
    fstack.start_sweeper()
    fstack.start_worker("w1", ready=False)
    fstack.start_worker("w2", ready=False)
    job_id = fstack.submit_sample(40, steps=8)
    fstack.wait_status(job_id, lambda j: 3 <= j.outputs_count < 30, 120, "some of the outputs")
    w1 = fstack.owner_of(job_id)
    w2 = next(p for p in fstack.procs if p is not w1 and getattr(p, "name", "").startswith("worker-w"))
    w1.signal(signal.SIGSTOP)  # frozen: no heartbeat, no progress; the lease runs out
    try:
        fstack.wait_status(job_id, lambda j: j.attempts == 2, 60, "another worker to take the job over")
        wait_until(lambda: any(o.attempt == 2 for o in fstack.outputs(job_id)), 60, "the new run to write")
        stale = sum(o.attempt == 1 for o in fstack.outputs(job_id))
    finally:
        w1.signal(signal.SIGCONT)
    # The old run wakes up mid-batch and goes on: its writes are refused and it stops.
    wait_until(lambda: f"job {job_id} attempt 1: lease_lost" in w1.output(), 60, "the stale run to give up")
    job = fstack.wait_final(job_id, 120)
    assert job.status == "succeeded" and job.attempts == 2
    fstack.assert_outputs_exactly_once(job_id, 40)
    assert sum(o.attempt == 1 for o in fstack.outputs(job_id)) == stale  # nothing from the stale run
    types = [t for t, _ in fstack.events(job_id)]
    assert types.count("succeeded") == 1 and types.count("started") == 2
    assert w1.alive() and w2.alive()
    # The stale worker is healthy and serves the next job.
    w2.signal(signal.SIGKILL)
    w2.wait_exit(10)
    nxt = fstack.submit_sample(2, steps=2)
    assert fstack.wait_final(nxt, 60).status == "succeeded"
    assert f"job {nxt}: attempt 1 claimed" in w1.output()


def test_6_a_job_that_kills_its_worker_every_time_ends_failed(fstack, settings):
    """The test plays the poison job's part: as soon as a worker claims the job, its whole process
    group is SIGKILLed (as an OOM killer or a crashing driver would). After ``max_attempts`` the
    sweeper fails the job; it is never delivered again."""
    fstack.start_api()
    fstack.start_sweeper()
    job_id = fstack.submit_sample(20, steps=8, max_attempts=2)
    for attempt in (1, 2):
        w = fstack.start_worker(f"w{attempt}", ready=False)
        fstack.wait_status(job_id, lambda j, a=attempt: j.attempts == a and j.status == "running", 90,
                           f"attempt {attempt} to be claimed", interval=0.02)
        w.signal(signal.SIGKILL)
        w.wait_exit(10)
    job = fstack.wait_final(job_id, 30)
    assert job.status == "failed" and job.attempts == 2
    assert job.error["code"] == "attempts_exhausted" and "every attempt" in job.error["message"]
    # Not delivered again: a fresh worker and more sweeps leave it alone.
    w3 = fstack.start_worker("w3")
    other = fstack.submit_sample(1, steps=2)
    assert fstack.wait_final(other, 60).status == "succeeded"  # w3 is consuming
    assert fstack.job(job_id).status == "failed"
    assert [t for t, _ in fstack.events(job_id)].count("started") == 2
    assert job_id not in w3.output()
    r = redis_client(settings)
    assert not any(job_id.encode() in m for m in r.lrange("sample", 0, -1))
    sweeps = [ln for ln in next(p for p in fstack.procs if "sweeper" in str(p.log_path)).output().splitlines()
              if job_id in ln]
    failed_at = next(i for i, ln in enumerate(sweeps) if re.search(rf"failed=\[[^\]]*{job_id}", ln))
    assert not any(re.search(rf"requeued=\[[^\]]*{job_id}", ln) for ln in sweeps[failed_at:]), sweeps


def test_6b_an_executor_that_dies_every_time_spends_the_attempts(fstack):
    """Only the executor child dies (the worker process survives): each death spends an attempt and
    requeues the job at once; after ``max_attempts`` it ends failed with the cause. The worker goes
    on serving with a fresh executor."""
    fstack.start_api()
    w = fstack.start_worker("w1")
    job_id = fstack.submit_sample(60, steps=8, max_attempts=2)
    for attempt in (1, 2):
        def running_here(a=attempt):
            j = fstack.job(job_id)
            return j.attempts == a and j.status == "running" and any(o.attempt == a for o in fstack.outputs(job_id))
        wait_until(running_here, 90, f"attempt {attempt} to make outputs", interval=0.02)
        pid = w.executor_pid()
        assert pid is not None
        import os

        os.kill(pid, signal.SIGKILL)
        wait_dead(pid)
    job = fstack.wait_final(job_id, 60)
    assert job.status == "failed" and job.attempts == 2
    assert job.error["code"] == "attempts_exhausted" and "SIGKILL" in job.error["message"], job.error
    requeued = [d for t, d in fstack.events(job_id) if t == "requeued"]
    assert len(requeued) == 1 and requeued[0]["reason"] == "executor_died"
    assert w.alive()
    nxt = fstack.submit_sample(2, steps=2)
    _j = fstack.wait_final(nxt, 90); assert _j.status == "succeeded", _j.error


def test_sigkill_mid_webdataset_job_every_image_in_exactly_one_shard(fstack):
    """As test 3, with WebDataset shards of 4 images: the retry rebuilds only the shards the killed
    run had not recorded; every image is in exactly one shard, and what is stored is what is recorded."""
    import hashlib
    import io
    import tarfile

    from shared.db import session_scope
    from shared.models import JobShard
    from shared.storage import get_storage, sample_key

    shard_env = {"LDMQ_WDS_SHARD_IMAGES": "4"}
    fstack.start_api(shard_env)
    fstack.start_sweeper()
    fstack.start_worker("w1", ready=False)
    fstack.start_worker("w2", ready=False)
    job_id = fstack.submit_sample(40, steps=8, output_format="webdataset")
    fstack.wait_status(job_id, lambda j: 8 <= j.outputs_count < 36, 120, "some of the shards")
    victim = fstack.owner_of(job_id)
    victim.signal(signal.SIGKILL)
    victim.wait_exit(10)
    before = fstack.job(job_id)
    assert before.status == "running" and before.outputs_count % 4 == 0  # whole shards only
    job = fstack.wait_final(job_id, 120)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    outs = fstack.outputs(job_id)
    pairs = [(o.row, o.index) for o in outs]
    assert len(pairs) == len(set(pairs)) == 40 and fstack.job(job_id).outputs_count == 40
    with session_scope(fstack.settings) as s:
        shards = [(sh.shard, sh.key, sh.sha256, sh.images, sh.attempt)
                  for sh in s.query(JobShard).filter_by(job_id=job_id).order_by(JobShard.shard)]
    assert [n for n, *_ in shards] == list(range(10)) and all(n == 4 for *_, n, _ in shards)
    assert sum(a == 1 for *_, a in shards) >= before.outputs_count // 4  # what attempt 1 recorded stayed
    st = get_storage(fstack.settings)
    assert st.list(f"{job.tenant_id}/jobs/{job_id}/shards/") == [k for _, k, *_ in shards]
    assert st.list(f"{job.tenant_id}/jobs/{job_id}/rows/") == []
    by_key = {}
    for o in outs:
        by_key.setdefault(o.key, {})[f"{sample_key(o.row, o.index)}.png"] = o.sha256
    for _, k, sha, _, _ in shards:
        data = st.get_bytes(k)
        assert hashlib.sha256(data).hexdigest() == sha
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            pngs = {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                    for m in tar if m.name.endswith(".png")}
        assert pngs == by_key[k]  # the shard holds exactly the images recorded in it, byte for byte
    row_done = [d["row"] for t, d in fstack.events(job_id) if t == "row_done"]
    assert sorted(row_done) == list(range(1, 41))
