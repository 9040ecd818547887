"""Which queued job a woken worker takes: the policy, as one SQL statement, and the fair-share
ledger it reads.

A Celery message only wakes a worker of its queue (``sample`` or ``train``); the worker then
takes the best ready job of that type from PostgreSQL, whatever job the message named:

1. **Across tenants, weighted fair share over recent usage.** A tenant's standing is
   ``(decayed GPU-seconds + seconds its running jobs have run since last charged + running jobs ×
   sched_running_charge_s) / weight``; lowest first. Usage is charged from the lease holder's run
   time (times its ``charge_share``: jobs packed into one run's batches split its time by images,
   ``shared.jobstate.share_charge``) at every heartbeat and at the run's end (:func:`charge`) into
   ``tenant_usage``, one row a tenant, kept decayed by half every ``sched_half_life_s``
   (exponential decay: the charge is ``u·2^(-(now-t)/h) + Δ``, so the row never needs a sweep). Tenants whose live running jobs
   reach ``max_running`` are skipped; a claim for a tenant with a ``max_running`` is then checked
   again under a per-tenant lock (:func:`hold_cap`), since concurrent statements cannot see each
   other's claims.
2. **Within a tenant, priority then age, with aging:** ``jobs.sched_key`` (``shared.models.sched_key``),
   read from the partial index ``ix_jobs_claim (tenant_id, type, sched_key) WHERE status='queued'``.
3. **Recovery first:** a job of an eligible tenant whose lease expired (its worker died) is
   re-claimed before new work, as before (attempts and fencing unchanged).

The statement (:data:`_PG_CLAIM`) ranks the tenants (a few rows: ``tenants`` ⋈ ``tenant_usage``
⋈ the running jobs, ≤ one per worker), then walks them in rank order with a ``LATERAL`` probe of
``ix_jobs_claim`` taking the first row ``FOR UPDATE SKIP LOCKED``, and stops at the first tenant
that yields one (a nested loop under ``LIMIT 1``: the tenants after it are never probed, and only
the row taken is locked). The ``UPDATE`` around it sets the lease and bumps ``attempts`` (the
fencing token) in the same statement, so a claim is still one conditional write; its ``started``
event is inserted by the same statement too (``started``: one round trip fewer a claim, which is
two, the statement and the commit). EXPLAIN ANALYZE
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

# A tenant's ledger decayed to now (``u``: its tenant_usage row, absent for a tenant that never ran).
_DECAYED = """coalesce(u.usage_s * power(0.5, (CASE WHEN :now_s > u.updated_s THEN :now_s - u.updated_s ELSE 0 END)
                                             / :half_life), 0)"""

# A running job's time since its last charge, at its share (what the charge will book).
_INFLIGHT = "sum((:now_s - coalesce(charged_s, :now_s)) * charge_share)"

# The tenants' standing. ``live``: running jobs whose lease holds (an expired one is a dead
# worker's: not running, and re-claimable). Decay: 0.5 ^ (Δt / half-life), Δt ≥ 0 against skew.
_RANK_CTES = """
live AS (
    SELECT tenant_id, count(*) AS n, {inflight} AS inflight
    FROM {table}
    WHERE status = 'running' AND lease_expires_at >= :now
    GROUP BY tenant_id
),
ranked AS (
    SELECT t.id AS tenant_id,
           ({decayed} + coalesce(l.inflight, 0) + coalesce(l.n, 0) * :reserve) / t.weight AS score
    FROM tenants t
    LEFT JOIN tenant_usage u ON u.tenant_id = t.id
    LEFT JOIN live l ON l.tenant_id = t.id
    WHERE t.weight > 0 AND (t.max_running IS NULL OR coalesce(l.n, 0) < t.max_running)
)"""

# ``pieces = 0``: a spread job is claimed through its pieces, never itself (shared.pieces).
_CLAIMABLE = "attempts < max_attempts AND NOT cancel_requested AND pieces = 0"

_SET = """status = 'running', attempts = attempts + 1, lease_owner = :owner, lease_expires_at = :expires,
       started_at = coalesce(started_at, :now), charged_s = :now_s, charge_share = 1"""

_RETURNING = "RETURNING id, attempts, tenant_id, priority, created_at, parent_id"
# PostgreSQL also returns the tenant's cap, so that :func:`hold_cap` runs only for capped tenants.
_PG_RETURNING = _RETURNING + ", (SELECT t.max_running FROM tenants t WHERE t.id = {table}.tenant_id) AS cap"

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
),
claimed AS (
    UPDATE {table} SET {set}
    WHERE id = coalesce((SELECT id FROM expired), (SELECT id FROM pick))
      AND {claimable} AND (status = 'queued' OR (status = 'running' AND lease_expires_at < :now))
    {returning}
),
started AS (
    INSERT INTO job_events (job_id, type, data, created_at)
    SELECT id, 'started', jsonb_build_object('attempt', attempts, 'worker', CAST(:owner AS text)), :now FROM claimed
)
SELECT * FROM claimed
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
    ranks = _RANK_CTES.format(table=table, decayed=_DECAYED, inflight=_INFLIGHT)
    pg = dialect == "postgresql"
    returning = _PG_RETURNING.format(table=table) if pg else _RETURNING
    return (_PG_CLAIM if pg else _LITE_CLAIM).format(ranks=ranks, table=table, set=_SET, claimable=_CLAIMABLE,
                                                    returning=returning)


@dataclass(frozen=True)
class Picked:
    job_id: str
    attempt: int
    tenant_id: str
    priority: int
    created_at: datetime
    parent_id: str | None = None
    event_recorded: bool = False  # the claim statement wrote the ``started`` event (PostgreSQL)


def _epoch(dt: datetime) -> float:
    return dt.timestamp()


def claim_params(settings: Settings, job_type: str, owner: str, now: datetime, lease_s: float) -> dict:
    return {"now": now, "now_s": _epoch(now), "expires": now + timedelta(seconds=lease_s), "owner": owner,
            "type": job_type, "half_life": float(settings.sched_half_life_s),
            "reserve": float(settings.sched_running_charge_s)}


def pick_and_claim(session: Session, settings: Settings, job_type: str, owner: str, lease_s: float,
                   now: datetime) -> Picked | None:
    """Run the claim statement. On PostgreSQL it also records the claim's ``started`` event
    (``event_recorded``); on SQLite the caller (``shared.jobstate.claim_next``) does."""
    dialect = session.get_bind().dialect.name
    stmt = _typed(text(claim_sql(dialect)), dialect, "now", "expires").columns(created_at=_dt_type())
    row = session.execute(stmt, claim_params(settings, job_type, owner, now, lease_s)).first()
    if row is None:
        return None
    pg = dialect == "postgresql"
    hold_cap(session, row[2], row[6] if pg else None, now)
    return Picked(row[0], row[1], row[2], row[3], row[4], row[5], event_recorded=pg)


# -- max_running under concurrent claims --------------------------------------------------------

CAP_LOCK_SPACE = 15001  # the first key of the tenant-cap advisory locks (the second: hashtext(tenant id))


class TenantAtCap(Exception):
    """A claim just made would run its tenant over ``max_running`` (another worker's claim for the
    tenant committed first). Raised inside the claim's transaction, which the session's owner
    rolls back: that undoes the claim as if it never happened (no attempt spent, no event)."""


def hold_cap(session: Session, tenant_id: str, cap: int | None, now: datetime, table: str = "jobs") -> None:
    """Make sure the claim this transaction just made keeps its tenant within ``max_running``
    (``cap``; None: no cap, nothing to do). Raises :class:`TenantAtCap` if it does not.

    Why a second look: the claim statement counts the tenant's live running jobs in its READ
    COMMITTED snapshot, taken when it starts, so two workers' claims for the same tenant that run
    at once each see the other's not yet committed claim as absent, and both start a job: a tenant
    at ``max_running`` - 1 ran ``max_running`` + 1 (``test_max_running_holds_when_two_claims_overlap``).
    Here, after the claim named its tenant, the transaction takes an advisory lock on the tenant
    (held to its end) and counts again in a new statement, whose snapshot is taken after the lock
    is granted: every other claim for the tenant has either committed by then (it is counted) or
    waits for this lock (it counts this one). The claims of one capped tenant are serialised from
    their recount to their commit (a few statements); claims of other tenants, and every claim of
    a tenant without a cap, never take the lock and pay nothing (the cap comes back with the
    claim's ``RETURNING``). A transaction holds at most one such lock (one claim per
    transaction), so they cannot deadlock. Cost: two statements more per claim of a capped tenant,
    a claim transaction's median 5.1 → 5.7 ms and 4.9 → 5.5 ms in two runs of 350 claims on this
    2-core VM (shared with other work); an uncapped tenant's claim 5.1 / 4.9 ms against 5.1 / 4.6 ms
    before this check, within the noise (its only addition: the cap, one primary-key probe in
    ``RETURNING``, 0.007 ms of the statement's 0.36 ms in ``ldmq bench scheduler --quick``'s
    EXPLAIN ANALYZE).

    PostgreSQL only: SQLite has one writer at a time, and a claim's transaction starts with its
    write, so its count always includes every committed claim and nothing can be in flight."""
    if cap is None or session.get_bind().dialect.name != "postgresql":
        return
    session.execute(text("SELECT pg_advisory_xact_lock(:space, hashtext(:tenant))"),
                    {"space": CAP_LOCK_SPACE, "tenant": tenant_id})
    live = session.scalar(text(f"SELECT count(*) FROM {table} WHERE tenant_id = :tenant AND status = 'running'"
                               " AND lease_expires_at >= :now"), {"tenant": tenant_id, "now": now})
    if live > cap:  # ours is counted (its lease runs from now)
        raise TenantAtCap(tenant_id)


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
    sql = f"WITH {_RANK_CTES.format(table='jobs', decayed=_DECAYED, inflight=_INFLIGHT)} SELECT tenant_id, score FROM ranked"
    stmt = _typed(text(sql), session.get_bind().dialect.name, "now")
    rows = session.execute(stmt, {"now": now, "now_s": _epoch(now), "half_life": float(settings.sched_half_life_s),
                                  "reserve": float(settings.sched_running_charge_s)}).all()
    return {r[0]: float(r[1]) for r in rows}


# -- preemption at checkpoints ------------------------------------------------------------------

# Everything :func:`preemption` weighs, in one read-only statement (no locks: it only advises a
# run to give its job back at its next checkpoint; the claim that follows decides for real).
# ``base``: each tenant's decayed usage plus its runs' uncharged time, its live runs, and those
# runs without ours (``n_other``). ``now_rank``: standings as the claim sees them now (every
# tenant, at its cap or not: it ranks running jobs). ``after``: standings as if our run were given
# back (its tenant runs one job fewer; its uncharged time stays, it is charged at the release),
# and only the tenants the claim would then consider (below ``max_running``). ``victim``: the
# running job of the type that the policy ranks last (worst tenant standing, then latest
# ``sched_key``). ``best``: the job the claim would take next from the queue, ranked by ``after``.
_PREEMPT_CTES = """
me AS (
    SELECT id, tenant_id, type, priority, sched_key FROM jobs
    WHERE id = :job AND attempts = :attempt AND status = 'running'
),
live AS (
    SELECT tenant_id, count(*) AS n, sum(CASE WHEN id = :job THEN 0 ELSE 1 END) AS n_other,
           {inflight} AS inflight
    FROM jobs
    WHERE status = 'running' AND lease_expires_at >= :now
    GROUP BY tenant_id
),
base AS (
    SELECT t.id AS tenant_id, t.weight, t.max_running, {decayed} + coalesce(l.inflight, 0) AS used,
           coalesce(l.n, 0) AS n, coalesce(l.n_other, 0) AS n_other
    FROM tenants t
    LEFT JOIN tenant_usage u ON u.tenant_id = t.id
    LEFT JOIN live l ON l.tenant_id = t.id
    WHERE t.weight > 0
),
now_rank AS (SELECT tenant_id, (used + n * :reserve) / weight AS score FROM base),
after AS (
    SELECT tenant_id, (used + n_other * :reserve) / weight AS score FROM base
    WHERE max_running IS NULL OR n_other < max_running
),
victim AS (
    SELECT j.id FROM jobs j JOIN now_rank r ON r.tenant_id = j.tenant_id
    WHERE j.status = 'running' AND j.lease_expires_at >= :now AND j.type = :type
    ORDER BY r.score DESC, j.tenant_id DESC, j.sched_key DESC
    LIMIT 1
)"""

_PG_BEST = """
best AS (
    SELECT c.id, c.tenant_id, c.priority, c.sched_key, c.since, r.score
    FROM (SELECT tenant_id, score FROM after ORDER BY score, tenant_id) r
    CROSS JOIN LATERAL (
        SELECT j.id, j.tenant_id, j.priority, j.sched_key, coalesce(j.enqueued_at, j.created_at) AS since
        FROM jobs j
        WHERE j.tenant_id = r.tenant_id AND j.type = :type AND j.status = 'queued'
          AND j.attempts < j.max_attempts AND NOT j.cancel_requested
        ORDER BY j.sched_key
        LIMIT 1
    ) c
    ORDER BY r.score, r.tenant_id
    LIMIT 1
)"""

_LITE_BEST = """
best AS (
    SELECT j.id, j.tenant_id, j.priority, j.sched_key, coalesce(j.enqueued_at, j.created_at) AS since, r.score
    FROM jobs j JOIN after r ON r.tenant_id = j.tenant_id
    WHERE j.type = :type AND j.status = 'queued' AND j.attempts < j.max_attempts AND NOT j.cancel_requested
    ORDER BY r.score, r.tenant_id, j.sched_key
    LIMIT 1
)"""

_PREEMPT_SELECT = """
SELECT me.tenant_id, me.priority, me.sched_key,
       (SELECT (b.used + b.n_other * :reserve) / b.weight FROM base b WHERE b.tenant_id = me.tenant_id) AS my_score,
       (SELECT id FROM victim) AS victim,
       best.id AS w_id, best.tenant_id AS w_tenant, best.priority AS w_priority, best.sched_key AS w_key,
       best.since AS w_since, best.score AS w_score
FROM me LEFT JOIN best ON 1 = 1
"""


@dataclass(frozen=True)
class Preemption:
    """Why a running job should give its worker slot back: ``waiting_job_id`` would be claimed in
    its place; ``reason`` "priority" (the same tenant's job of higher priority) or "fair_share"
    (another tenant's, whose standing is lower); ``waited_s``: how long it has been queued."""

    waiting_job_id: str
    reason: str
    waited_s: float

    def as_event(self) -> dict:
        return {"reason": self.reason, "waiting_job": self.waiting_job_id, "waited_s": round(self.waited_s, 1)}


def preemption(session: Session, settings: Settings, job_id: str, attempt: int, job_type: str, ran_s: float,
               now: datetime) -> Preemption | None:
    """Should this running job (``job_id`` under ``attempt``, running for ``ran_s`` seconds) yield
    its worker slot at its next checkpoint? None unless every one of these holds:

    1. Preemption is on (``Settings.preempt_after_s`` set and > 0) and the run has run at least
       that long (a job just resumed is not sent back at once: at most one switch per slot per
       ``preempt_after_s``).
    2. It is the running job of its type that the policy ranks last: its tenant's standing is the
       worst (highest) of the tenants running that type, and within that tenant it has the latest
       ``sched_key``. One waiting job then makes one run yield, not every run it outranks (with
       ``--concurrency N`` or many workers, the others would only be claimed straight back).
    3. The job the claim would take next if this run were given back (its tenant's standing
       without this run's reserve, tenants at ``max_running`` skipped as the claim skips them) is
       one the claim puts before this job, not this job itself, and it has been queued longer
       than ``preempt_after_s`` (since it was submitted or last given back): either
       (a) **priority**: the same tenant's, with a higher ``priority`` and an earlier ``sched_key``
       (aging counts: a job that has waited long enough to be ahead of a later urgent one is not
       preempted by it), or
       (b) **fair_share**: another tenant's, whose standing is strictly lower than this tenant's
       would be without this run (an under-served tenant).

    Not here but by construction: a run yields only at a checkpoint it writes itself, after the
    step it resumed from, so a preempted job has always made progress before it can yield again
    (``worker.runtime.preemption``). Fair-share preemption between two tenants with long jobs
    is time slicing: each keeps its slot at least ``preempt_after_s`` plus the steps to its next
    checkpoint. One statement, read-only: the tenants' ranking (a few rows), the running jobs of
    the type (≤ one per worker) and the claim's ``LATERAL`` probe of ``ix_jobs_claim``: 3 ms
    median, 7 ms p99 with 10⁵ queued train jobs over 4 tenants and 64 running (this 2-core VM,
    session included), asked once per heartbeat (10 s) per running train job, never per step.
    """
    after_s = settings.preempt_after_s
    if not after_s or ran_s < after_s:
        return None
    dialect = session.get_bind().dialect.name
    sql = "WITH " + _PREEMPT_CTES.format(decayed=_DECAYED, inflight=_INFLIGHT) + "," + (
        _PG_BEST if dialect == "postgresql" else _LITE_BEST) + _PREEMPT_SELECT
    stmt = _typed(text(sql), dialect, "now").columns(w_since=_dt_type())
    row = session.execute(stmt, {"job": job_id, "attempt": attempt, "type": job_type, "now": now,
                                 "now_s": _epoch(now), "half_life": float(settings.sched_half_life_s),
                                 "reserve": float(settings.sched_running_charge_s)}).first()
    if row is None or row.victim != job_id or row.w_id is None:
        return None
    waited = _epoch(now) - _epoch(_aware(row.w_since))
    if waited <= after_s:
        return None
    if row.w_tenant == row.tenant_id:
        if row.w_priority > row.priority and row.w_key < row.sched_key:
            return Preemption(row.w_id, "priority", waited)
        return None
    if row.my_score is None or row.w_score < row.my_score:  # None: its tenant's weight is 0 (paused)
        return Preemption(row.w_id, "fair_share", waited)
    return None


def _aware(dt: datetime) -> datetime:
    from datetime import timezone

    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt


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
