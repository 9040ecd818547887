"""Which queued job a woken worker takes: the policy, as one SQL statement, and the fair-share
ledger it reads.

A Celery message only wakes a worker of its queue (``sample`` or ``train``); the worker then
takes the best ready job of that type from PostgreSQL, whatever job the message named:

1. **Across tenants, weighted fair share over recent usage.** A tenant's standing is
   ``(decayed GPU-seconds + seconds its running jobs have run since last charged + running jobs ×
   sched_running_charge_s) / weight``; lowest first. Usage is charged from the lease holder's run
   time at every heartbeat and at the run's end (:func:`charge`) into ``tenant_usage``, one row a
   tenant, kept decayed by half every ``sched_half_life_s`` (exponential decay: the charge is
   ``u·2^(-(now-t)/h) + Δ``, so the row never needs a sweep). Tenants whose live running jobs
   reach ``max_running`` are skipped.
2. **Within a tenant, priority then age, with aging:** ``jobs.sched_key`` (``shared.models.sched_key``),
   read from the partial index ``ix_jobs_claim (tenant_id, type, sched_key) WHERE status='queued'``.
3. **Recovery first:** a job of an eligible tenant whose lease expired (its worker died) is
   re-claimed before new work, as before (attempts and fencing unchanged).

The statement (:data:`_PG_CLAIM`) ranks the tenants (a few rows: ``tenants`` ⋈ ``tenant_usage``
⋈ the running jobs, ≤ one per worker), then walks them in rank order with a ``LATERAL`` probe of
``ix_jobs_claim`` taking the first row ``FOR UPDATE SKIP LOCKED``, and stops at the first tenant
that yields one (a nested loop under ``LIMIT 1``: the tenants after it are never probed, and only
the row taken is locked). The ``UPDATE`` around it sets the lease and bumps ``attempts`` (the
fencing token) in the same statement, so a claim is still one conditional write. EXPLAIN ANALYZE
with 10⁶ queued jobs over 4 tenants and 256 running: ~1 ms (docs/benchmarks.md, "scheduler").

**Pieces of a spread job** (``shared.pieces``) are child rows of ``jobs``, so this statement claims
them as it claims any job; the parent row (``pieces`` > 0) is never claimed (``pieces = 0`` in the
probe: a queued parent is one row the probe steps over). A piece inherits its job's
``sched_key``, so a job's pieces stay together in its tenant's order, and the tenant ranking
counts running pieces as running jobs (each holds a worker), which is what fair share and
``max_running`` mean. (:func:`claim_sql` still takes a table name: a separate table was the other
design, weighed in ``shared.pieces``.)

SQLite (the embedded single-machine default) has neither ``LATERAL`` nor row locks, and one
writer at a time: there the same policy is one ``UPDATE … WHERE id = (SELECT … ORDER BY rank,
sched_key LIMIT 1)`` over a join (:data:`_LITE_CLAIM`), fine for the few jobs a demo queues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.settings import Settings

# The tenants' standing. ``live``: running jobs whose lease holds (an expired one is a dead
# worker's: not running, and re-claimable). Decay: 0.5 ^ (Δt / half-life), Δt ≥ 0 against skew.
_RANK_CTES = """
live AS (
    SELECT tenant_id, count(*) AS n, sum(:now_s - coalesce(charged_s, :now_s)) AS inflight
    FROM {table}
    WHERE status = 'running' AND lease_expires_at >= :now
    GROUP BY tenant_id
),
ranked AS (
    SELECT t.id AS tenant_id,
           (coalesce(u.usage_s * power(0.5, (CASE WHEN :now_s > u.updated_s THEN :now_s - u.updated_s ELSE 0 END)
                                             / :half_life), 0)
            + coalesce(l.inflight, 0) + coalesce(l.n, 0) * :reserve) / t.weight AS score
    FROM tenants t
    LEFT JOIN tenant_usage u ON u.tenant_id = t.id
    LEFT JOIN live l ON l.tenant_id = t.id
    WHERE t.weight > 0 AND (t.max_running IS NULL OR coalesce(l.n, 0) < t.max_running)
)"""

# ``pieces = 0``: a spread job is claimed through its pieces, never itself (shared.pieces).
_CLAIMABLE = "attempts < max_attempts AND NOT cancel_requested AND pieces = 0"

_SET = """status = 'running', attempts = attempts + 1, lease_owner = :owner, lease_expires_at = :expires,
       started_at = coalesce(started_at, :now), charged_s = :now_s"""

_RETURNING = "RETURNING id, attempts, tenant_id, priority, created_at, parent_id"

_PG_CLAIM = """
WITH {ranks},
expired AS (
    SELECT j.id FROM {table} j
    WHERE j.status = 'running' AND j.lease_expires_at < :now AND j.type = :type AND j.{claimable}
      AND j.tenant_id IN (SELECT tenant_id FROM ranked)
    ORDER BY j.lease_expires_at
    LIMIT 1 FOR UPDATE OF j SKIP LOCKED
),
pick AS (
    SELECT c.id
    FROM (SELECT tenant_id, score FROM ranked ORDER BY score, tenant_id) r
    CROSS JOIN LATERAL (
        SELECT j.id FROM {table} j
        WHERE j.tenant_id = r.tenant_id AND j.type = :type AND j.status = 'queued'
          AND j.attempts < j.max_attempts AND NOT j.cancel_requested AND j.pieces = 0
        ORDER BY j.sched_key
        LIMIT 1 FOR UPDATE OF j SKIP LOCKED
    ) c
    ORDER BY r.score, r.tenant_id
    LIMIT 1
)
UPDATE {table} SET {set}
WHERE id = coalesce((SELECT id FROM expired), (SELECT id FROM pick))
  AND {claimable} AND (status = 'queued' OR (status = 'running' AND lease_expires_at < :now))
{returning}
"""

_LITE_CLAIM = """
WITH {ranks}
UPDATE {table} SET {set}
WHERE id = (
    SELECT j.id FROM {table} j JOIN ranked r ON r.tenant_id = j.tenant_id
    WHERE j.type = :type AND j.attempts < j.max_attempts AND NOT j.cancel_requested AND j.pieces = 0
      AND (j.status = 'queued' OR (j.status = 'running' AND j.lease_expires_at < :now))
    ORDER BY CASE WHEN j.status = 'running' THEN 0 ELSE 1 END, r.score, r.tenant_id, j.sched_key
    LIMIT 1)
  AND {claimable} AND (status = 'queued' OR (status = 'running' AND lease_expires_at < :now))
{returning}
"""


def claim_sql(dialect: str, table: str = "jobs") -> str:
    """The claim statement for ``dialect`` over ``table`` (``jobs``; a future ``pieces`` table)."""
    ranks = _RANK_CTES.format(table=table)
    template = _PG_CLAIM if dialect == "postgresql" else _LITE_CLAIM
    return template.format(ranks=ranks, table=table, set=_SET, claimable=_CLAIMABLE, returning=_RETURNING)


@dataclass(frozen=True)
class Picked:
    job_id: str
    attempt: int
    tenant_id: str
    priority: int
    created_at: datetime
    parent_id: str | None = None


def _epoch(dt: datetime) -> float:
    return dt.timestamp()


def claim_params(settings: Settings, job_type: str, owner: str, now: datetime, lease_s: float) -> dict:
    return {"now": now, "now_s": _epoch(now), "expires": now + timedelta(seconds=lease_s), "owner": owner,
            "type": job_type, "half_life": float(settings.sched_half_life_s),
            "reserve": float(settings.sched_running_charge_s)}


def pick_and_claim(session: Session, settings: Settings, job_type: str, owner: str, lease_s: float,
                   now: datetime) -> Picked | None:
    """Run the claim statement; the caller (``shared.jobstate.claim_next``) records the event."""
    dialect = session.get_bind().dialect.name
    stmt = _typed(text(claim_sql(dialect)), dialect, "now", "expires").columns(created_at=_dt_type())
    row = session.execute(stmt, claim_params(settings, job_type, owner, now, lease_s)).first()
    if row is None:
        return None
    return Picked(row[0], row[1], row[2], row[3], row[4], row[5])


def _dt_type():
    from shared.models import UTCDateTime

    return UTCDateTime()


def _typed(stmt, dialect: str, *names: str):
    """SQLite keeps datetimes as naive UTC text: bind them as the ORM does (psycopg needs nothing)."""
    if dialect == "postgresql":
        return stmt
    from sqlalchemy import bindparam

    return stmt.bindparams(*(bindparam(n, type_=_dt_type()) for n in names))


# -- the ledger ---------------------------------------------------------------------------------

_PG_CHARGE = """
INSERT INTO tenant_usage (tenant_id, usage_s, updated_s) VALUES (:tenant, :charge, :now_s)
ON CONFLICT (tenant_id) DO UPDATE SET
    usage_s = tenant_usage.usage_s * power(0.5, (CASE WHEN :now_s > tenant_usage.updated_s
                                                      THEN :now_s - tenant_usage.updated_s ELSE 0 END) / :half_life)
              + excluded.usage_s,
    updated_s = CASE WHEN :now_s > tenant_usage.updated_s THEN :now_s ELSE tenant_usage.updated_s END
"""


def charge(session: Session, settings: Settings | None, tenant_id: str, seconds: float, now_s: float) -> None:
    """Add ``seconds`` of run time to the tenant's decayed usage (one upsert; SQLite has the same
    ``ON CONFLICT`` syntax). ``settings`` None: the default half-life."""
    if seconds <= 0:
        return
    half_life = settings.sched_half_life_s if settings is not None else Settings.model_fields["sched_half_life_s"].default
    session.execute(text(_PG_CHARGE), {"tenant": tenant_id, "charge": float(seconds), "now_s": now_s,
                                       "half_life": float(half_life)})


def decayed(usage_s: float, updated_s: float, now_s: float, half_life_s: float) -> float:
    """The ledger's value at ``now_s`` (what the claim computes in SQL), for reports and tests."""
    return usage_s * math.pow(0.5, max(0.0, now_s - updated_s) / half_life_s)


def standings(session: Session, settings: Settings, now: datetime) -> dict[str, float]:
    """Every eligible tenant's score as the claim sees it (lower goes first): for tests, the bench
    and operators' questions ("why did B run before A?")."""
    sql = f"WITH {_RANK_CTES.format(table='jobs')} SELECT tenant_id, score FROM ranked"
    stmt = _typed(text(sql), session.get_bind().dialect.name, "now")
    rows = session.execute(stmt, {"now": now, "now_s": _epoch(now), "half_life": float(settings.sched_half_life_s),
                                  "reserve": float(settings.sched_running_charge_s)}).all()
    return {r[0]: float(r[1]) for r in rows}


# -- where a queued job stands ------------------------------------------------------------------

QUEUE_SCAN_CAP = 10_000  # rows a position estimate reads per tenant: bounds a GET on a huge queue


@dataclass(frozen=True)
class QueuePosition:
    """Work ahead of a queued job under the policy, and when it may start (an estimate).

    ``jobs_ahead``/``images_ahead``: the tenant's own queued jobs of the type that come first
    (priority, age, aging: exact up to :data:`QUEUE_SCAN_CAP` rows), plus, for each other tenant with
    queued work of the type, what fair share gives it while this tenant's work ahead and the job
    itself run: ``(own images ahead + this job's) × its weight / this tenant's weight``, at most what
    it has queued. Current usage differences, running work and ``max_running`` are left out (a
    tenant behind on usage runs sooner than this says). A spread job ahead counts once in
    ``jobs_ahead`` and by its queued pieces' images (``shared.pieces``). ``exact``: no scan was capped.
    ``estimated_wait_s``: images ahead × ``sched_seconds_per_image`` / the jobs of the type running
    now (at least 1, standing in for the workers); None for train jobs (no per-image figure)."""

    jobs_ahead: int
    images_ahead: int
    exact: bool
    estimated_wait_s: float | None
    workers: int


def _queued_before(session: Session, tenant_id: str, job_type: str, key: float | None) -> tuple[int, int, bool]:
    from sqlalchemy import func, select

    from shared.models import Job

    # What workers claim: jobs that run whole and pieces (a spread job counted once, by its id).
    q = select(Job.total_items, func.coalesce(Job.parent_id, Job.id).label("job")).where(
        Job.tenant_id == tenant_id, Job.type == job_type, Job.status == "queued", Job.pieces == 0)
    if key is not None:
        q = q.where(Job.sched_key < key)
    sub = q.order_by(Job.sched_key).limit(QUEUE_SCAN_CAP).subquery()
    n, units, images = session.execute(select(func.count(func.distinct(sub.c.job)), func.count(),
                                              func.coalesce(func.sum(sub.c.total_items), 0))).one()
    return int(n), int(images), units < QUEUE_SCAN_CAP


def queue_position(session: Session, settings: Settings, job, now: datetime) -> QueuePosition:
    """Where ``job`` (queued) stands; a handful of capped index scans (one per tenant with a weight)."""
    from sqlalchemy import func, select

    from shared.models import Job, Tenant

    jobs, images, exact = _queued_before(session, job.tenant_id, job.type, job.sched_key)
    weights = dict(session.execute(select(Tenant.id, Tenant.weight).where(Tenant.weight > 0)).all())
    own_weight = weights.get(job.tenant_id) or 1.0
    mine = images + max(1, job.total_items or 0)
    for tid, weight in weights.items():
        if tid == job.tenant_id:
            continue
        n, imgs, ok = _queued_before(session, tid, job.type, None)
        if n == 0:
            continue
        share = mine * weight / own_weight
        if imgs > share:  # only part of its queue comes first: count jobs pro rata
            n = max(1, round(n * share / imgs)) if imgs else n
            imgs = int(share)
        jobs, images, exact = jobs + n, images + imgs, exact and ok
    workers = session.scalar(select(func.count()).select_from(Job).where(
        Job.type == job.type, Job.status == "running", Job.lease_expires_at >= now)) or 0
    wait = images * settings.sched_seconds_per_image / max(1, workers) if job.type == "sample" else None
    return QueuePosition(jobs, images, exact, wait, int(workers))
