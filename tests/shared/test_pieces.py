"""Spread sample jobs (shared.pieces) and their transitions (shared.jobstate) against real Postgres:
the parent is never claimed, pieces write to it fenced by their own attempts, the last piece ends
it, a failed piece fails it, a cancel reaches every piece."""

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from shared import jobstate, pieces, usage
from shared.db import session_scope
from shared.jobstate import LeaseLost
from shared.models import Job, JobEvent, JobOutput, JobRow, JobStatus, utcnow
from tests.conftest import race


# -- what a piece is -----------------------------------------------------------------------------

def test_plan_splits_evenly_and_leaves_small_jobs_whole():
    assert pieces.plan(300, 128) == [(0, 100), (100, 200), (200, 300)]
    assert pieces.plan(256, 128) == [(0, 128), (128, 256)]
    assert pieces.plan(129, 128) == [(0, 64), (64, 129)] and pieces.plan(10, 4) == [(0, 3), (3, 6), (6, 10)]
    assert pieces.plan(128, 128) == [] and pieces.plan(5, 128) == [] and pieces.plan(10_000, 0) == []
    spans = pieces.plan(10_000, 128)
    assert len(spans) == 79 and spans[0][0] == 0 and spans[-1][1] == 10_000
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and max(e - s for s, e in spans) <= 128


def test_a_webdataset_job_is_cut_at_its_shard_boundaries():
    """Pieces of whole shards (``unit``): as many as fit in a piece, at least one."""
    assert pieces.plan(7, 4, unit=3) == [(0, 3), (3, 6), (6, 7)]  # 4 images hold one shard of 3
    assert pieces.plan(10, 6, unit=2) == [(0, 4), (4, 10)]  # 5 shards, 3 a piece at most: 2 + 3
    assert pieces.plan(5000, 128, unit=1000) == [(i * 1000, (i + 1) * 1000) for i in range(5)]
    assert pieces.plan(1000, 128, unit=1000) == [] and pieces.plan(6, 6, unit=3) == []
    job = Job(type="sample", total_items=7, params={"output_format": "webdataset", "shard_images": 3})
    assert [(p.item_start, p.item_end) for p in pieces.split(job, 4)] == [(0, 3), (3, 6), (6, 7)]
    assert job.pieces == 3


def test_a_piece_makes_its_span_of_the_rows_images():
    rows = [JobRow(row=1, num_images=3), JobRow(row=2, num_images=1), JobRow(row=3, num_images=4)]
    spans = pieces.plan(8, 3)
    assert spans == [(0, 2), (2, 5), (5, 8)]
    made = [pieces.Piece(f"p{i}", "job", s, e).images(rows) for i, (s, e) in enumerate(spans)]
    assert made[0] == {(1, 0), (1, 1)}
    assert made[1] == {(1, 2), (2, 0), (3, 0)}  # across rows
    assert made[2] == {(3, 1), (3, 2), (3, 3)}
    every = set().union(*made)
    assert len(every) == sum(len(m) for m in made) == 8  # each image in exactly one piece


# -- the state machine -----------------------------------------------------------------------------

def make_spread(settings, tenant_id, *, images=(3, 1, 4), per_piece=3, max_attempts=2) -> tuple[str, list[str]]:
    """A sample job with rows of ``images`` images, split as a submit splits it: (job, pieces in order)."""
    with session_scope(settings) as s:
        now = utcnow()
        job = Job(tenant_id=tenant_id, type="sample", params={}, total_items=sum(images), max_attempts=max_attempts,
                  created_at=now, enqueued_at=now)
        job.rows = [JobRow(row=i, prompt=f"p{i}", seed=i, num_images=n) for i, n in enumerate(images, start=1)]
        parts = pieces.split(job, per_piece)
        s.add(job)
        s.flush()
        s.add_all(parts)
        return job.id, [p.id for p in parts]


def get(settings, job_id) -> Job:
    with session_scope(settings) as s:
        return s.get(Job, job_id)


def events(settings, job_id) -> list[str]:
    with session_scope(settings) as s:
        return list(s.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def claim_next(settings, owner="w", now=None):
    with session_scope(settings) as s:
        return jobstate.claim_next(s, settings, "sample", owner, 30, now=now)


def record(settings, piece_id, attempt, row, index):
    with session_scope(settings) as s:
        return jobstate.record_outputs(s, piece_id, attempt, [dict(row=row, index=index, seed=0, key=f"k{row}-{index}",
                                                                  width=8, height=8, sha256="0" * 64)])


def finish(settings, claim, status=JobStatus.succeeded, **kw):
    with session_scope(settings) as s:
        jobstate.finish(s, claim.job_id, claim.attempt, status, **kw)


@pytest.fixture
def spread(settings, make_tenant):
    from tests.conftest import cancel_unfinished_jobs

    cancel_unfinished_jobs(settings.database_url)  # claim_next takes the best job of any tenant
    tid, _ = make_tenant()
    return make_spread(settings, tid)


def test_the_job_is_never_claimed_each_of_its_pieces_is_once(settings, spread):
    job_id, parts = spread
    assert len(parts) == 3 and get(settings, job_id).pieces == 3
    with session_scope(settings) as s:
        assert jobstate.claim(s, job_id, "w", 30) is None
    claims = [claim_next(settings, f"w{i}") for i in range(4)]
    # The pieces share their job's place in the queue (sched_key), so their order among themselves
    # is the index's, not item order (seen in CI): what matters is each is claimed once.
    assert sorted(c.job_id for c in claims[:3]) == sorted(parts) and claims[3] is None
    assert all(c.parent_id == job_id and c.attempt == 1 for c in claims[:3])
    job = get(settings, job_id)
    assert job.status == "running" and job.attempts == 0 and job.started_at is not None
    assert events(settings, job_id) == ["started"]  # once, however many pieces start
    with session_scope(settings) as s:
        assert job_id not in {c.job_id for c in jobstate.sweep_candidates(s)}


def test_pieces_write_to_the_job_fenced_by_their_own_attempt_and_the_last_one_ends_it(settings, spread):
    job_id, parts = spread
    c = [claim_next(settings) for _ in parts]
    assert record(settings, c[0].job_id, 1, 1, 0) == {(1, 0)}
    # Piece 0's lease expires and another run takes it over: the old run is fenced off.
    with session_scope(settings) as s:
        again = jobstate.claim(s, parts[0], "w2", 30, now=utcnow() + timedelta(seconds=60))
    assert again.attempt == 2
    with pytest.raises(LeaseLost):
        record(settings, parts[0], 1, 1, 1)
    assert record(settings, parts[0], 2, 1, 0) == set()  # already made: stored once
    for row, index in ((1, 1), (1, 2)):
        record(settings, parts[0], 2, row, index)
    with session_scope(settings) as s:
        jobstate.set_progress(s, parts[0], 2, 1.0, event=True)
    job = get(settings, job_id)
    assert job.outputs_count == 3 and job.progress == pytest.approx(3 / 8)
    assert job.progress_detail == {"images_done": 3, "images_total": 8}
    assert "row_done" in events(settings, job_id)
    finish(settings, again)
    finish(settings, c[1])
    assert get(settings, job_id).status == "running"  # piece 2 still runs
    finish(settings, c[2], model_id=None)
    job = get(settings, job_id)
    assert job.status == "succeeded" and job.progress == 1.0 and job.finished_at is not None
    assert events(settings, job_id).count("succeeded") == 1
    with session_scope(settings) as s:
        outs = s.execute(select(JobOutput.job_id, JobOutput.attempt)).all()
    assert all(j != parts[0] for j, _ in outs)  # nothing is stored under a piece


def test_a_piece_out_of_attempts_fails_the_job_and_stops_its_siblings(settings, spread):
    job_id, parts = spread
    first = claim_next(settings)
    second = claim_next(settings)
    record(settings, second.job_id, second.attempt, 2, 0)
    for attempt in (1, 2):  # the executor dies under piece 0 twice (max_attempts 2)
        if attempt == 2:
            with session_scope(settings) as s:
                first = jobstate.claim(s, parts[0], "w", 30)
            assert first.attempt == 2
        with session_scope(settings) as s:
            word = jobstate.retry_or_fail(s, first.job_id, first.attempt, {"code": "executor_died", "message": "x"})
        assert word == ("requeued" if attempt == 1 else "failed")
    assert get(settings, parts[2]).status == "canceled"  # was queued
    assert get(settings, parts[1]).cancel_requested  # runs: asked to stop
    assert get(settings, job_id).status == "running"  # until its running piece has stopped
    with session_scope(settings) as s:
        assert jobstate.heartbeat(s, second.job_id, second.attempt, 30) is True
    finish(settings, second, JobStatus.canceled)
    job = get(settings, job_id)
    assert job.status == "failed" and job.error["code"] == "attempts_exhausted"
    assert job.outputs_count == 1  # what was made is kept
    assert events(settings, job_id)[-1] == "failed"


def test_cancel_reaches_every_piece_and_the_job_ends_with_its_last(settings, spread):
    job_id, parts = spread
    running = claim_next(settings)
    with session_scope(settings) as s:
        jobstate.request_cancel(s, job_id)
    assert [get(settings, p).status for p in parts] == ["running", "canceled", "canceled"]
    assert get(settings, job_id).status == "running"
    with session_scope(settings) as s:
        assert jobstate.cancel_requested(s, running.job_id, running.attempt)
    assert claim_next(settings) is None
    finish(settings, running, JobStatus.canceled)
    assert get(settings, job_id).status == "canceled"
    assert events(settings, job_id) == ["started", "canceled"]


def test_cancel_of_a_queued_spread_job_ends_it_at_once(settings, spread):
    job_id, parts = spread
    with session_scope(settings) as s:
        jobstate.request_cancel(s, job_id)
    assert get(settings, job_id).status == "canceled"
    assert all(get(settings, p).status == "canceled" for p in parts)
    assert claim_next(settings) is None


def test_the_sweeper_ends_a_dead_piece_and_its_job(settings, spread):
    """A piece whose worker died on its last attempt is failed by the sweeper; the job with it once
    its other pieces have stopped; a canceled job whose piece's worker died ends canceled."""
    job_id, parts = spread
    claims = [claim_next(settings) for _ in parts]
    with session_scope(settings) as s:
        s.execute(Job.__table__.update().where(Job.id == parts[0]).values(max_attempts=1))
    later = utcnow() + timedelta(seconds=60)
    finish(settings, claims[1])
    with session_scope(settings) as s:
        assert jobstate.fail_exhausted(s, now=later) == [parts[0]]
    assert get(settings, parts[2]).cancel_requested and get(settings, job_id).status == "running"
    with session_scope(settings) as s:
        assert jobstate.cancel_abandoned(s, now=later + timedelta(seconds=60)) == [parts[2]]
    job = get(settings, job_id)
    assert job.status == "failed" and job.error["code"] == "attempts_exhausted"


def test_pieces_ending_together_end_the_job_once(settings, make_tenant):
    from tests.conftest import cancel_unfinished_jobs

    cancel_unfinished_jobs(settings.database_url)
    tid, _ = make_tenant()
    for _ in range(5):
        job_id, parts = make_spread(settings, tid, images=(2,) * 8, per_piece=2)
        claims = [claim_next(settings, f"w{i}") for i in range(len(parts))]
        it = iter(claims)
        race(len(claims), lambda: finish(settings, next(it)))
        assert get(settings, job_id).status == "succeeded"
        assert events(settings, job_id).count("succeeded") == 1


# -- what clients see ------------------------------------------------------------------------------

def test_a_big_submit_is_one_job_to_the_client(settings, tiny_model):
    tid, key, model_id = tiny_model
    from api.app import create_app

    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": model_id, "steps": 2, "prompts": [{"prompt": "a", "num_images": 6}, {"prompt": "b", "num_images": 4}]}
    with TestClient(create_app(settings.model_copy(update={"sample_piece_images": 4}))) as c:
        r = c.post("/v1/jobs/sample", json=body, headers=headers)
        assert r.status_code == 202, r.text
        job = r.json()
        small = c.post("/v1/jobs/sample", json={**body, "prompts": [{"prompt": "c", "num_images": 4}]}, headers=headers)
        listed = c.get("/v1/jobs", headers=headers).json()
        with session_scope(settings) as s:
            parts = list(s.scalars(select(Job).where(Job.parent_id == job["id"]).order_by(Job.item_start)))
            assert usage.queued_work(s, tid).images_queued == 14  # counted once, not once more per piece
            assert usage.queued_work(s, tid).jobs_queued == 2
            assert s.get(Job, small.json()["id"]).pieces == 0
        assert [(p.item_start, p.item_end) for p in parts] == [(0, 3), (3, 6), (6, 10)]
        assert all(p.sched_key == parts[0].sched_key and p.model_id is None for p in parts)
        assert {j["id"] for j in listed["items"]} == {job["id"], small.json()["id"]}
        assert c.get(f"/v1/jobs/{parts[0].id}", headers=headers).status_code == 404
        got = c.get(f"/v1/jobs/{job['id']}", headers=headers).json()
        assert got["status"] == "queued" and got["total_items"] == 10
        assert got["queue"]["jobs_ahead"] == 0
        assert c.get(f"/v1/jobs/{small.json()['id']}", headers=headers).json()["queue"]["images_ahead"] == 10


def test_a_released_piece_goes_back_to_the_queue_and_a_stale_one_ends_nothing(settings, spread):
    job_id, parts = spread
    c = claim_next(settings)
    with session_scope(settings) as s:
        assert jobstate.release(s, c.job_id, c.attempt, "worker shutdown")
    assert get(settings, c.job_id).status == "queued" and get(settings, job_id).status == "running"
    with session_scope(settings) as s:
        again = jobstate.claim(s, c.job_id, "w2", 30)
    assert again.attempt == 2  # the fencing token moved on: the released run's writes are refused
    with pytest.raises(LeaseLost):
        finish(settings, c, JobStatus.failed, error={"code": "x", "message": "stale"})
    assert get(settings, job_id).status == "running" and not get(settings, parts[1]).cancel_requested
