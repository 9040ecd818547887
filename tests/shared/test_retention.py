"""Retention (``LDMQ_RETENTION_DAYS``) applied by the sweeper, called directly with ages set in the
database; and ``Storage.delete_prefix``. Real Postgres and an S3 server."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.db import session_scope
from shared.models import Dataset, Job, JobOutput, Model, utcnow
from shared.processes.sweeper import housekeeping
from shared.storage import FileStorage, UnsafeKey, get_storage, job_prefix, output_key


def make_job(settings, tid, *, status, days_ago, model_id=None, dataset_id=None) -> str:
    storage = get_storage(settings)
    ended = utcnow() - timedelta(days=days_ago)
    with session_scope(settings) as s:
        job = Job(tenant_id=tid, type="sample", params={}, status=status, model_id=model_id, dataset_id=dataset_id,
                  created_at=ended - timedelta(minutes=5),
                  finished_at=ended if status in ("succeeded", "failed", "canceled") else None)
        s.add(job)
        s.flush()
        key = output_key(tid, job.id, 1, 0)
        s.add(JobOutput(job_id=job.id, row=1, index=0, seed=1, key=key, width=8, height=8, sha256="0" * 64, attempt=1))
        job_id = job.id
    storage.put_bytes(key, b"png")
    return job_id


def stored(settings, tid, job_id) -> list[str]:
    return get_storage(settings).list(job_prefix(tid, job_id) + "/")


def exists(settings, entity, ident) -> bool:
    with session_scope(settings) as s:
        return s.get(entity, ident) is not None


def test_retention_deletes_only_old_final_jobs(settings, tiny_model):
    tid, _, model_id = tiny_model
    with session_scope(settings) as s:
        ds = Dataset(tenant_id=tid, name="d", key=f"{tid}/datasets/d/archive.zip", num_images=1)
        s.add(ds)
        s.flush()
        ds_id = ds.id
    old_done = make_job(settings, tid, status="succeeded", days_ago=40, model_id=model_id, dataset_id=ds_id)
    old_failed = make_job(settings, tid, status="failed", days_ago=31)
    recent = make_job(settings, tid, status="succeeded", days_ago=2)
    old_running = make_job(settings, tid, status="running", days_ago=40)
    old_queued = make_job(settings, tid, status="queued", days_ago=40, model_id=model_id)

    assert housekeeping(settings)["expired"] == []  # retention_days=0 (the default): keep forever
    assert exists(settings, Job, old_done)

    kept = settings.model_copy(update={"retention_days": 30})
    expired = housekeeping(kept)["expired"]
    assert set(expired) >= {old_done, old_failed}
    assert not set(expired) & {recent, old_running, old_queued}
    for job_id in (old_done, old_failed):
        assert not exists(settings, Job, job_id) and stored(settings, tid, job_id) == []
    for job_id in (recent, old_running, old_queued):
        assert exists(settings, Job, job_id) and stored(settings, tid, job_id)
    # Models and datasets are never removed by retention (the model is still in use, too).
    assert exists(settings, Model, model_id) and exists(settings, Dataset, ds_id)
    assert get_storage(settings).list(f"{tid}/models/{model_id}/")


def test_retention_works_in_bounded_batches(settings, make_tenant):
    tid, _ = make_tenant()
    jobs = [make_job(settings, tid, status="succeeded", days_ago=400 + i) for i in range(3)]
    batch = settings.model_copy(update={"retention_days": 365, "retention_batch": 2})
    # Other tests' old jobs share the database: pass until these are gone, each pass at most 2,
    # the oldest first.
    order: list[str] = []
    for _ in range(20):
        expired = housekeeping(batch)["expired"]
        assert len(expired) <= 2
        order += [j for j in expired if j in jobs]
        if len(order) == 3:
            break
    assert order == jobs[::-1]
    assert all(stored(settings, tid, j) == [] for j in jobs)


def test_sweep_once_reports_what_retention_deleted(settings, make_tenant):
    from shared.processes.sweeper import sweep_once

    tid, _ = make_tenant()
    old = make_job(settings, tid, status="canceled", days_ago=10)
    result = sweep_once(settings.model_copy(update={"retention_days": 7}))
    assert old in result["expired"] and not exists(settings, Job, old)


@pytest.mark.parametrize("backend", ["s3", "file"])
def test_delete_prefix_keeps_what_it_is_told_and_refuses_non_folders(settings, tmp_path, backend):
    storage = get_storage(settings) if backend == "s3" else FileStorage(tmp_path / "objects")
    for key in ("t/jobs/a/x.png", "t/jobs/a/eval/keep.png", "t/jobs/ab/y.png"):
        storage.put_bytes(key, b"1")
    assert storage.delete_prefix("t/jobs/a/", keep={"t/jobs/a/eval/keep.png"}) == 1
    assert storage.list("t/jobs/") == ["t/jobs/a/eval/keep.png", "t/jobs/ab/y.png"]
    with pytest.raises(UnsafeKey):
        storage.delete_prefix("t/jobs/a")  # would also match t/jobs/ab
    with pytest.raises(UnsafeKey):
        storage.delete_prefix("/")
