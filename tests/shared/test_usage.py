"""shared.usage on fixtures with known timestamps: queued images (what max_queued_images bounds) and
GPU-seconds over a window (the overlap of each run with it), on PostgreSQL and on SQLite."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy.orm import Session

from shared import usage
from shared.db import make_engine, session_scope
from shared.models import Base, Job, Tenant

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
H = timedelta(hours=1)


def _job(tenant_id, type_, status, *, total=0, made=0, started=None, finished=None) -> Job:
    return Job(tenant_id=tenant_id, type=type_, status=status, total_items=total, outputs_count=made,
               started_at=started, finished_at=finished, params={})


def _fixture(session: Session) -> tuple[str, str]:
    a, b = Tenant(name=f"a-{id(session)}", weight=1.0), Tenant(name=f"b-{id(session)}", weight=2.0)
    session.add_all([a, b])
    session.flush()
    session.add_all([
        _job(a.id, "sample", "queued", total=10),                                    # 10 images queued
        _job(a.id, "sample", "running", total=8, made=3, started=NOW - 0.5 * H),     # 5 left; 1800 s so far
        _job(a.id, "train", "queued"),                                               # counts 1
        _job(a.id, "train", "running", started=NOW - 30 * H),                        # 1; the window's 24 h
        _job(a.id, "sample", "succeeded", total=4, made=4, started=NOW - 2 * H, finished=NOW - 1 * H),  # 3600 s
        _job(a.id, "sample", "failed", total=4, made=1, started=NOW - 25 * H, finished=NOW - 23 * H),   # 3600 s in
        _job(a.id, "sample", "succeeded", total=4, made=4, started=NOW - 30 * H, finished=NOW - 26 * H),  # outside
        _job(a.id, "sample", "canceled", total=6),                                   # never ran: nothing
        _job(a.id, "sample", "queued", total=2, started=NOW - 3 * H),                # released: runs again later
        _job(b.id, "sample", "running", total=100, made=1, started=NOW - 0.25 * H),  # another tenant's
    ])
    session.flush()
    return a.id, b.id


def _check(session: Session) -> None:
    a, b = _fixture(session)
    work = usage.queued_work(session, a)
    assert work == usage.QueuedWork(jobs_queued=3, jobs_running=2, images_queued=10 + 5 + 1 + 1 + 2)
    assert usage.queued_work(session, b).images_queued == 99
    used = usage.gpu_seconds(session, NOW - 24 * H, NOW)
    assert used[a] == pytest.approx(1800 + 24 * 3600 + 3600 + 3600, abs=1e-3)
    assert used[b] == pytest.approx(900, abs=1e-3)
    assert usage.tenant_gpu_seconds(session, a, NOW) == pytest.approx(used[a], abs=1e-3)
    # A window that ends in the past cuts the running jobs at its end.
    assert usage.gpu_seconds(session, NOW - 2 * H, NOW - 1 * H, [a]) == {a: pytest.approx(3600 + 3600, abs=1e-3)}


def test_queued_images_and_gpu_seconds_on_postgres(settings):
    with session_scope(settings) as s:
        _check(s)
        s.rollback()


def test_the_same_numbers_on_sqlite(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'u.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        _check(s)


def test_a_new_job_adds_its_images_and_a_train_job_one():
    assert usage.images_of("sample", 12) == 12
    assert usage.images_of("train", 0) == usage.TRAIN_JOB_IMAGES == 1
