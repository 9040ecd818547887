"""What a tenant has queued and what it used: the numbers behind the submit quota
(``max_queued_images``), ``GET /v1/usage``, the dashboard, and the scheduler's fair share.

**Queued images** are the images a tenant's work still has to make: for each queued or running
sample job, its images not yet made (``total_items - outputs_count``), and
:data:`TRAIN_JOB_IMAGES` for each queued or running train job. A train job makes no images to
count, but it must count for something, or a tenant at its quota could still queue any number
of them; one is the least that bounds them (``max_running`` and the ``LDMQ_TRAIN_*`` bounds limit
what each costs).

**GPU-seconds** are wall time of runs holding a worker: for each job of the tenant, the overlap
of ``[started_at, finished_at]`` (``now`` while it runs) with the window. It is what a worker
was held for, not what its device computed (loading a pipeline and uploads count). Jobs
co-batched into one run share that run's worker and each counts its own wall time, so their sum
can exceed the worker time (the fair-share ledger splits it instead: ``shared.jobstate.share_charge``); ``started_at`` is a job's first start, so a job that ran again after
a release or a lost lease counts from its first start, and a job queued again after running
counts nothing until it runs again.

**Spread jobs** (``shared.pieces``): the job's row counts for queued work (its images not yet
made: its pieces record their outputs on it), its pieces for GPU-seconds (each held a worker; the
job's own span would count the same time again).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, func, literal, or_, select
from sqlalchemy.orm import Session

from shared.models import Job, JobStatus, JobType, utcnow

#: What a queued or running train job counts as against ``max_queued_images`` (see above).
TRAIN_JOB_IMAGES = 1
USAGE_WINDOW = timedelta(hours=24)
ACTIVE = (JobStatus.queued.value, JobStatus.running.value)


@dataclass(frozen=True)
class QueuedWork:
    jobs_queued: int
    jobs_running: int
    images_queued: int


def images_of(job_type: str, total_items: int) -> int:
    """What a new job adds to its tenant's queued images."""
    return total_items if job_type == JobType.sample.value else TRAIN_JOB_IMAGES


def _images_left():
    made = func.coalesce(Job.outputs_count, 0)
    total = func.coalesce(Job.total_items, 0)
    return case((Job.type != JobType.sample.value, TRAIN_JOB_IMAGES), (total > made, total - made), else_=0)


def queued_work(session: Session, tenant_id: str) -> QueuedWork:
    """The tenant's queued and running jobs and the images they have yet to make (one query)."""
    rows = session.execute(
        select(Job.status, func.count(), func.coalesce(func.sum(_images_left()), 0))
        .where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE), Job.parent_id.is_(None))
        .group_by(Job.status)
    ).all()
    counts = {status: (int(n), int(images)) for status, n, images in rows}
    queued, running = counts.get(JobStatus.queued.value, (0, 0)), counts.get(JobStatus.running.value, (0, 0))
    return QueuedWork(jobs_queued=queued[0], jobs_running=running[0], images_queued=queued[1] + running[1])


def _seconds(session: Session, later, earlier):
    """``later - earlier`` in seconds, in SQL (PostgreSQL's epoch of an interval; SQLite's julianday)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", later - earlier)
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


def gpu_seconds(session: Session, since: datetime, now: datetime | None = None,
                tenant_ids: list[str] | None = None) -> dict[str, float]:
    """GPU-seconds (wall time of runs holding a worker; see the module docstring) per tenant over
    ``[since, now]``, for ``tenant_ids`` (None: every tenant that used any). One aggregate query.

    Its cost grows with the tenant's jobs (no index leads to the window: 149 ms for a tenant with
    200,000 jobs, 43,000 of them in the last 24 h, on the loaded 2-core VM): fine for
    ``GET /v1/usage`` and a scheduler's periodic refresh, too slow for every claim; an index on
    ``finished_at`` would bound it by the window. :func:`queued_work` uses the ``(status, …)``
    index: 0.8 ms with 400 active jobs among 400,000."""
    now = now or utcnow()
    t_since, t_now = literal(since, Job.started_at.type), literal(now, Job.started_at.type)
    end = case((Job.finished_at.is_(None), t_now), (Job.finished_at > t_now, t_now), else_=Job.finished_at)
    start = case((Job.started_at < t_since, t_since), else_=Job.started_at)
    q = (select(Job.tenant_id, func.sum(_seconds(session, end, start)))
         .where(Job.started_at.is_not(None), Job.started_at < t_now, Job.pieces == 0,
                or_(Job.finished_at > t_since, (Job.finished_at.is_(None) & (Job.status == JobStatus.running.value))))
         .group_by(Job.tenant_id))
    if tenant_ids is not None:
        q = q.where(Job.tenant_id.in_(tenant_ids))
    return {tid: max(0.0, float(total or 0.0)) for tid, total in session.execute(q)}


def tenant_gpu_seconds(session: Session, tenant_id: str, now: datetime | None = None,
                       window: timedelta = USAGE_WINDOW) -> float:
    now = now or utcnow()
    return gpu_seconds(session, now - window, now, [tenant_id]).get(tenant_id, 0.0)
