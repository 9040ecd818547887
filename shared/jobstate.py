"""The job state machine. Every transition is one conditional UPDATE, so two processes racing on
the same job cannot both win, and a final state never changes.

    queued -> running -> succeeded | failed | canceled
    queued -> canceled
    running (lease expired) -> running (re-claimed, attempts + 1) | failed (attempts exhausted)
    running -> queued   (release: worker shutdown, preemption, lost database; the attempt is refunded)
    running -> queued | failed   (retry_or_fail: the run's process died; the attempt is spent)

``attempts`` is the fencing token: a claim returns it, and every later write of that run
(progress, outputs, checkpoints, the final state) carries it and is refused once another run
has claimed the job.

A woken worker takes the best ready job by policy (:func:`claim_next`, the statement lives in
``shared.scheduler``); :func:`claim` takes one named job (a sample run packing a companion job
into its batches, tools and tests). Both set the lease and bump the token in one UPDATE; for a
tenant with a ``max_running`` a recount under a per-tenant lock follows, and a claim that would
run the tenant over its cap raises :class:`TenantAtCap` for the owner to roll back
(``shared.scheduler.hold_cap`` says why a statement alone cannot hold the cap). Every
run's time is charged to its tenant's fair-share usage at each heartbeat and at its end, at the
run's ``charge_share`` (1, or a packed job's share of a batch run: :func:`share_charge`).

**Spread jobs** (``shared.pieces``). A big sample job is split at submit into pieces, child rows
of ``jobs``; the parent (``pieces`` > 0) is never claimed, each piece runs the machine above with
its own lease and attempts. The parent's own transitions, each one conditional UPDATE:

    parent queued -> running          when a piece is first claimed (or first records outputs)
    parent queued | running -> succeeded | failed | canceled
                                      when its last live piece reaches a final state (:func:`settle`,
                                      in that piece's transaction): failed if any piece failed (its
                                      error), else canceled if any was canceled, else succeeded
    piece failed -> its queued siblings canceled, its running siblings asked to cancel (the job
                    fails; outputs already made are kept)
    cancel of the parent -> queued pieces canceled, running pieces asked to cancel (one UPDATE each)

So a parent is final exactly when all its pieces are, and no piece writes into a job that has
ended. Every transaction that takes a piece to a final state, or records its outputs, locks the
parent row first (:func:`lock_parent_of`): piece endings are serialized per job, so the one that
sees no live sibling is the last, and locks are always taken parent before piece (no deadlock
between a piece's writes and a sibling's failure or a cancel). The claim never waits for the
parent: it moves it to running only if no one holds it (``SKIP LOCKED``); the piece's first
recorded batch does it otherwise. A piece's outputs, progress and ``row_done`` go to the parent,
fenced by the piece's own attempt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import and_, case, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from shared import scheduler
from shared.db import insert_for
from shared.models import FINAL_STATUSES, Job, JobEvent, JobOutput, JobRow, JobShard, JobStatus, Tenant, utcnow
from shared.scheduler import TenantAtCap as TenantAtCap  # what claim and claim_next raise
from shared.settings import Settings

_FINAL = [s.value for s in FINAL_STATUSES]
_LIVE = [JobStatus.queued.value, JobStatus.running.value]


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    lease_expires_at: datetime
    tenant_id: str | None = None  # for log context
    priority: int = 0  # for the queue-wait metric
    waited_s: float | None = None  # first claim only: seconds from submit to this claim
    parent_id: str | None = None  # a piece of a spread job: the job it belongs to


class LeaseLost(Exception):
    """This run no longer owns the job (another run claimed it, or it reached a final state)."""


def emit(session: Session, job_id: str, type_: str, data: dict[str, Any] | None = None) -> None:
    """Append an event in the caller's transaction (so it exists iff the change it reports does).
    A Core INSERT, not ``session.add``: no unit-of-work flush at the commit (~1 ms of a worker's CPU
    per transition, most of a claim's client-side cost in ``ldmq bench scheduler``)."""
    session.execute(insert(JobEvent).values(job_id=job_id, type=type_, data=data or {}, created_at=utcnow()))


def _fenced(job_id: str, attempt: int):
    return and_(Job.id == job_id, Job.attempts == attempt, Job.status == JobStatus.running.value)


def claim(session: Session, job_id: str, owner: str, lease_s: float, now: datetime | None = None) -> Claim | None:
    """Take the job if it is queued, or running under an expired lease, and attempts remain, and its
    tenant runs fewer than its ``max_running`` jobs.

    Returns the claim (with its fencing token) or None when another run holds the job or it is final.
    Raises :class:`TenantAtCap` when another worker's claim for the tenant committed first and
    this one would run it over ``max_running`` (``shared.scheduler.hold_cap``): the owner rolls
    the transaction back, which undoes the claim.
    """
    now = now or utcnow()
    expires = now + timedelta(seconds=lease_s)
    stmt = (
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempts < Job.max_attempts,
            Job.cancel_requested.is_(False),
            Job.pieces == 0,  # a spread job's pieces are claimed, never the job itself
            or_(
                Job.status == JobStatus.queued.value,
                and_(Job.status == JobStatus.running.value, Job.lease_expires_at < now),
            ),
            _below_max_running(now),
        )
        .values(
            status=JobStatus.running.value,
            attempts=Job.attempts + 1,
            lease_owner=owner,
            lease_expires_at=expires,
            started_at=_coalesce_started(now),
            charged_s=now.timestamp(),
            charge_share=1.0,
        )
        .returning(Job.attempts, Job.tenant_id, Job.priority, Job.created_at, Job.parent_id, _cap())
        .execution_options(synchronize_session=False)
    )
    row = session.execute(stmt).one_or_none()
    if row is None:
        return None
    attempt, tenant_id, priority, created_at, parent_id, cap = row
    scheduler.hold_cap(session, tenant_id, cap, now)
    return _started(session, job_id, attempt, owner, expires, tenant_id, priority, created_at, now, parent_id)


def _below_max_running(now: datetime):
    """The job's tenant has no ``max_running`` or runs fewer live jobs than it (the policy's rule,
    for a claim by id)."""
    live = aliased(Job)
    running = (select(func.count()).select_from(live)
               .where(live.tenant_id == Job.tenant_id, live.status == JobStatus.running.value,
                      live.lease_expires_at >= now)
               .scalar_subquery())
    cap = _cap()
    return or_(cap.is_(None), running < cap)


def _cap():
    return select(Tenant.max_running).where(Tenant.id == Job.tenant_id).scalar_subquery()


def claim_next(session: Session, settings: Settings, job_type: str, owner: str, lease_s: float,
               now: datetime | None = None) -> Claim | None:
    """Take the best ready job of ``job_type`` by the scheduling policy (``shared.scheduler``): an
    expired lease of an eligible tenant first, else the best-ranked tenant's first job by priority,
    age and aging. One UPDATE with ``FOR UPDATE SKIP LOCKED`` inside, so concurrent workers take
    different jobs without waiting for each other. None when nothing is claimable. Raises
    :class:`TenantAtCap` as :func:`claim` does; the owner rolls back and claims again (the next
    statement sees that tenant at its cap and passes it over: ``worker.runtime.run.claim_next_run``)."""
    now = now or utcnow()
    picked = scheduler.pick_and_claim(session, settings, job_type, owner, lease_s, now)
    if picked is None:
        return None
    expires = now + timedelta(seconds=lease_s)
    return _started(session, picked.job_id, picked.attempt, owner, expires, picked.tenant_id, picked.priority,
                    picked.created_at, now, picked.parent_id, event=not picked.event_recorded)


def _started(session: Session, job_id: str, attempt: int, owner: str, expires: datetime, tenant_id: str,
             priority: int, created_at: datetime | None, now: datetime, parent_id: str | None = None, *,
             event: bool = True) -> Claim:
    """What a claim returns, after its ``started`` event (unless the claim statement wrote it) and,
    for a piece, its job's move to running."""
    if event:
        emit(session, job_id, "started", {"attempt": attempt, "worker": owner})
    if parent_id is not None:
        _parent_running(session, parent_id, now, {"worker": owner, "piece": job_id}, skip_locked=True)
    if created_at is not None and created_at.tzinfo is None:  # SQLite's naive UTC text
        created_at = created_at.replace(tzinfo=timezone.utc)
    waited = (now - created_at).total_seconds() if attempt == 1 and created_at is not None else None
    return Claim(job_id, attempt, expires, tenant_id, priority or 0, waited, parent_id)


# -- spread jobs: the parent of pieces (see the module docstring and shared.pieces) ---------------

def lock_parent_of(session: Session, job_id: str) -> str | None:
    """The job ``job_id`` is a piece of, its row locked until the commit; None for a job that runs
    whole (nothing locked). Taken first by every transaction that ends a piece or records its
    outputs, so that a job's pieces end one after another and locks go parent before piece."""
    parent = session.scalar(select(Job.parent_id).where(Job.id == job_id))
    if parent is not None:
        _lock_job(session, parent)
    return parent


def _lock_job(session: Session, job_id: str) -> None:
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())


def _parent_running(session: Session, parent_id: str, now: datetime, data: dict[str, Any], *,
                    skip_locked: bool = False) -> None:
    """parent queued -> running (its ``started`` event), once. ``skip_locked``: a claim, which must
    not wait for the parent's lock (it holds the piece's, and the parent's holder may want that);
    when skipped, the piece's first recorded batch does it."""
    target = aliased(Job)
    pick = select(target.id).where(target.id == parent_id, target.status == JobStatus.queued.value)
    if skip_locked:
        pick = pick.with_for_update(skip_locked=True)
    res = session.execute(update(Job).where(Job.id == pick.scalar_subquery(), Job.status == JobStatus.queued.value)
                          .values(status=JobStatus.running.value, started_at=_coalesce_started(now))
                          .execution_options(synchronize_session=False))
    if res.rowcount == 1:
        emit(session, parent_id, "started", data)


def settle(session: Session, parent_id: str, now: datetime | None = None) -> str | None:
    """The parent's final state once none of its pieces is live (its lock held: see
    :func:`lock_parent_of`): failed if a piece failed (the first failed piece's error), else
    canceled if one was canceled, else succeeded. One conditional UPDATE; returns the state set,
    or None while a piece is still live or when the parent has ended already."""
    now = now or utcnow()
    c = aliased(Job)

    def any_piece(*where):
        return select(c.id).where(c.parent_id == parent_id, *where).exists()

    failed, canceled = any_piece(c.status == JobStatus.failed.value), any_piece(c.status == JobStatus.canceled.value)
    first_error = (select(c.error).where(c.parent_id == parent_id, c.status == JobStatus.failed.value)
                   .order_by(c.item_start).limit(1).scalar_subquery())
    status = case((failed, JobStatus.failed.value), (canceled, JobStatus.canceled.value),
                  else_=JobStatus.succeeded.value)
    row = session.execute(
        update(Job)
        .where(Job.id == parent_id, Job.status.in_(_LIVE), ~any_piece(c.status.in_(_LIVE)))
        .values(status=status, finished_at=now, lease_owner=None, lease_expires_at=None, error=first_error,
                progress=case((or_(failed, canceled), Job.progress), else_=1.0))
        .returning(Job.status, Job.error, Job.model_id)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    final, error, model_id = row
    emit(session, parent_id, final, {"error": error} if error else {"model_id": model_id} if model_id else {})
    return final


def _stop_siblings(session: Session, parent_id: str, now: datetime) -> None:
    """A piece failed, or the job was canceled: its queued pieces end canceled, its running ones are
    asked to stop (they poll the flag every second). One UPDATE each."""
    ids = session.execute(
        update(Job).where(Job.parent_id == parent_id, Job.status == JobStatus.queued.value)
        .values(status=JobStatus.canceled.value, finished_at=now, cancel_requested=True)
        .returning(Job.id).execution_options(synchronize_session=False)
    ).scalars().all()
    for piece in ids:
        emit(session, piece, "canceled", {})
    session.execute(
        update(Job).where(Job.parent_id == parent_id, Job.status == JobStatus.running.value)
        .values(cancel_requested=True).execution_options(synchronize_session=False)
    )


def _piece_ended(session: Session, parent_id: str | None, status: str, now: datetime) -> None:
    """After a piece reached ``status`` (final), with its parent locked: a failure stops the
    siblings; the last piece settles the job."""
    if parent_id is None:
        return
    if status == JobStatus.failed.value:
        _stop_siblings(session, parent_id, now)
    settle(session, parent_id, now)


def _take_charge(session: Session, job_id: str, attempt: int, now: datetime) -> tuple[str, float] | None:
    """The run's time since its last charge at its ``charge_share``, taken (its cursor moved on,
    fenced and conditional, so a heartbeat and an end racing for the same interval charge it
    once): (tenant, seconds)."""
    return _update_taking_charge(session, job_id, attempt, _run_row(session, job_id, attempt), now, {})[1]


def _run_row(session: Session, job_id: str, attempt: int):
    """The run's row as a beat or an end needs it, in one read (no lock): its job if it is a piece
    (``parent_id``), and its charge cursor (``tenant_id``, ``charged_s``, ``charge_share``). None
    when the run no longer holds the job."""
    return session.execute(select(Job.parent_id, Job.tenant_id, Job.charged_s, Job.charge_share)
                           .where(_fenced(job_id, attempt))).first()


def _hold_run(session: Session, job_id: str, attempt: int):
    """:func:`_run_row`, its job locked first if it is a piece (locks go job before piece, as in
    :func:`lock_parent_of`); raises LeaseLost when the run no longer holds the job."""
    run = _run_row(session, job_id, attempt)
    if run is None:
        raise LeaseLost(job_id)
    if run.parent_id is not None:
        _lock_job(session, run.parent_id)
    return run


def _update_taking_charge(session: Session, job_id: str, attempt: int, run, now: datetime, values: dict[str, Any],
                          returning=None):
    """One fenced UPDATE of the run's row with ``values`` that also moves its charge cursor on from
    what :func:`_run_row` read (``run``), conditional on it. Returns (the UPDATE's returned row, or
    True when nothing is returned; None when the run no longer holds the job, or, with no
    ``values``, when there was nothing to take) and what it took, (tenant, seconds) or None.

    Why one statement: a heartbeat was six round trips (its job's id, the cursor read, the cursor
    write, the lease write, the ledger, the commit) and is now four, and a run's end two fewer. On
    the 2-core VM a beat took 1.9 ms of the worker's CPU and now 1.2 ms, an end 2.2 → 1.5 ms (one
    thread looping claim, beat, end against 20,000 queued jobs). ``ldmq bench scheduler``'s 256
    simulated workers spend more than a core on these calls, on the machine the database runs on.
    If the cursor moved under it (the run's co-batching charged it at once), the write goes through
    without the charge, which that took."""
    def run_update(extra: dict[str, Any], *where):
        stmt = (update(Job).where(_fenced(job_id, attempt), *where).values(**values, **extra)
                .execution_options(synchronize_session=False))
        if returning is not None:
            return session.execute(stmt.returning(*returning)).first()
        return True if session.execute(stmt).rowcount == 1 else None

    if run is not None and run.charged_s is not None:
        now_s = now.timestamp()
        got = run_update({"charged_s": now_s}, Job.charged_s == run.charged_s)
        if got is not None:
            return got, (run.tenant_id, (now_s - run.charged_s) * run.charge_share)
    return (run_update({}) if values else None), None


def share_charge(session: Session, runs: list[tuple[str, int, int]], settings: Settings | None = None,
                 now: datetime | None = None) -> None:
    """Runs that share one device batch from now on (a sample run and the jobs packed into its
    batches): ``(job_id, attempt, images)`` each. Each is charged ``images / all images`` of the
    time from now, so together they are charged the run's time once, not once each (three jobs
    packed together were charged three times the worker's time), split as the images are. Each
    run's time so far is charged first at its old share (the lead ran alone until now).

    The share is fixed for the rest of the run: a packed job that leaves early (canceled, lease
    lost) takes its share with it, and the others are not charged more for the time left (under
    charging by that share, never over). A claim sets the share back to 1."""
    total = sum(images for _, _, images in runs)
    if len(runs) < 2 or total <= 0:
        return
    now = now or utcnow()
    for job_id, attempt, images in runs:
        _book(session, settings, _take_charge(session, job_id, attempt, now), now)
        session.execute(update(Job).where(_fenced(job_id, attempt)).values(charge_share=images / total)
                        .execution_options(synchronize_session=False))


def _book(session: Session, settings: Settings | None, taken: tuple[str, float] | None, now: datetime) -> None:
    """Add what :func:`_take_charge` took to the tenant's ledger: the transaction's last statement,
    so the ledger row (one per tenant, shared by all its runs) is locked only until the commit."""
    if taken is not None:
        scheduler.charge(session, settings, taken[0], taken[1], now.timestamp())


def _coalesce_started(now: datetime):
    return func.coalesce(Job.started_at, now)


def heartbeat(session: Session, job_id: str, attempt: int, lease_s: float, now: datetime | None = None,
              settings: Settings | None = None) -> bool:
    """Renew the lease and charge the run time since the last beat to the tenant's fair-share usage.
    Returns whether cancel was requested; raises LeaseLost if not ours any more."""
    now = now or utcnow()
    run = _hold_run(session, job_id, attempt)  # a piece's beat takes its job first, as a cancel does
    row, taken = _update_taking_charge(session, job_id, attempt, run, now,
                                       {"lease_expires_at": now + timedelta(seconds=lease_s)},
                                       returning=(Job.cancel_requested,))
    if row is None:
        raise LeaseLost(job_id)
    _book(session, settings, taken, now)
    return bool(row[0])


def set_progress(session: Session, job_id: str, attempt: int, progress: float, detail: dict[str, Any] | None = None,
                 *, event: bool = True) -> None:
    """Write the job's progress (fenced); with ``event``, also append a ``progress`` event (the
    stream, webhooks and loss curves read those): a worker passes what its :class:`ProgressEvents`
    says, so the row is always current while the outbox grows at a bounded rate. For a piece, its
    own row takes ``progress``; its job's row takes its outputs so far (and the event)."""
    parent = lock_parent_of(session, job_id)
    values: dict[str, Any] = {"progress": max(0.0, min(1.0, float(progress)))}
    if detail is not None:
        values["progress_detail"] = detail
    res = session.execute(update(Job).where(_fenced(job_id, attempt)).values(**values).execution_options(synchronize_session=False))
    if res.rowcount == 0:
        raise LeaseLost(job_id)
    if parent is not None:  # the piece's own figure stays on its row; the job's is its outputs so far
        done, total = session.execute(select(Job.outputs_count, Job.total_items).where(Job.id == parent)).one()
        job_id, detail = parent, {"images_done": done, "images_total": total}
        values = {"progress": min(1.0, done / max(1, total)), "progress_detail": detail}
        session.execute(update(Job).where(Job.id == parent).values(**values).execution_options(synchronize_session=False))
    if event:
        emit(session, job_id, "progress", {"progress": values["progress"], **(detail or {})})


class ProgressEvents:
    """Which progress reports of a run also become ``progress`` events: at most one per job every
    ``min_interval_s`` (``LDMQ_PROGRESS_EVENT_MIN_S``, 1 s), plus every report its caller marks
    ``force`` (a job's or a training stage's last step, so the final loss and step are never lost).

    Why: the job row takes every report (one UPDATE), but each event is a row that the stream,
    the webhook sender and the dashboard read again. Reports come once per batch of a sample run
    and every 10 steps of training: on this 2-core VM 2–3 a second for a sample job (40 images/s
    in batches of 16), but a GPU runs a tiny model at hundreds of steps or images a second, which
    would be tens of events a second per job, for no more than a progress bar redrawn per second.
    A run's own state (one per process writing progress), so it needs no query and no lock."""

    def __init__(self, min_interval_s: float, clock=time.monotonic):
        self.min_interval_s, self._clock = min_interval_s, clock
        self._last: dict[str, float] = {}

    def due(self, job_id: str, *, force: bool = False) -> bool:
        """Whether this report of ``job_id`` is an event; if so it counts as the latest one."""
        now = self._clock()
        last = self._last.get(job_id)
        if not (force or last is None or now - last >= self.min_interval_s):
            return False
        self._last[job_id] = now
        if len(self._last) > 256:  # a long-lived writer sees many jobs: forget those already due again
            self._last = {j: t for j, t in self._last.items() if now - t < self.min_interval_s}
        return True


def set_checkpoint(session: Session, job_id: str, attempt: int, key: str, info: dict[str, Any] | None = None) -> None:
    """Point the job at its latest checkpoint (the pointer lives in the DB, not in storage).
    ``info`` (the checkpoint's step and evaluation metrics) goes into its ``checkpoint`` event, so
    a stream or webhook shows them without reading storage."""
    res = session.execute(update(Job).where(_fenced(job_id, attempt)).values(checkpoint_key=key).execution_options(synchronize_session=False))
    if res.rowcount == 0:
        raise LeaseLost(job_id)
    emit(session, job_id, "checkpoint", {**(info or {}), "key": key, "attempt": attempt})


def finish(
    session: Session,
    job_id: str,
    attempt: int,
    status: JobStatus,
    *,
    error: dict[str, Any] | None = None,
    model_id: str | None = None,
    settings: Settings | None = None,
) -> None:
    """running -> a final state, only for the run that holds the job (its last run time charged).
    A piece's end may end its job (:func:`settle`)."""
    assert status in FINAL_STATUSES
    now = utcnow()
    run = _hold_run(session, job_id, attempt)
    parent = run.parent_id
    values: dict[str, Any] = {
        "status": status.value,
        "finished_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
        "error": error,
    }
    if status is JobStatus.succeeded:
        values["progress"] = 1.0
    if model_id is not None:
        values["model_id"] = model_id
    done, taken = _update_taking_charge(session, job_id, attempt, run, now, values)
    if done is None:
        raise LeaseLost(job_id)
    emit(session, job_id, status.value, {"error": error} if error else {"model_id": model_id} if model_id else {})
    _piece_ended(session, parent, status.value, now)
    _book(session, settings, taken, now)


def release(session: Session, job_id: str, attempt: int, reason: str = "worker shutdown",
            settings: Settings | None = None, preempted: dict[str, Any] | None = None) -> bool:
    """Give the job back to the queue at once: running -> queued, without spending an attempt.

    ``attempts`` is never decremented (it is the fencing token, and a token must never be handed
    out twice); the attempt is refunded by raising ``max_attempts`` by one instead. The job keeps
    its ``sched_key``: back in the queue, it is where it was. ``preempted`` (the run yielded at a
    checkpoint: reason, waiting job) becomes a ``preempted`` event before the ``requeued`` one.
    """
    now = utcnow()
    taken = _take_charge(session, job_id, attempt, now)
    res = session.execute(
        update(Job)
        .where(_fenced(job_id, attempt))
        .values(status=JobStatus.queued.value, lease_owner=None, lease_expires_at=None,
                max_attempts=Job.max_attempts + 1, enqueued_at=now)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:
        if preempted is not None:
            emit(session, job_id, "preempted", {**preempted, "attempt": attempt})
        emit(session, job_id, "requeued", {"reason": reason, "attempt": attempt})
        _book(session, settings, taken, now)
        return True
    return False


def retry_or_fail(session: Session, job_id: str, attempt: int, error: dict[str, Any],
                  settings: Settings | None = None) -> str | None:
    """The run's process died under it (crash, OOM kill): spend the attempt and requeue the job, or
    fail it when no attempt is left (a poison job; a piece's failure fails its job). Returns
    "requeued", "failed", or None when the run no longer holds the job."""
    parent = lock_parent_of(session, job_id)
    job = session.execute(
        select(Job.attempts, Job.max_attempts).where(_fenced(job_id, attempt)).with_for_update()
    ).first()
    if job is None:
        return None
    now = utcnow()
    taken = _take_charge(session, job_id, attempt, now)  # the row is locked above
    if job.attempts < job.max_attempts:
        session.execute(
            update(Job).where(_fenced(job_id, attempt))
            .values(status=JobStatus.queued.value, lease_owner=None, lease_expires_at=None, enqueued_at=now)
            .execution_options(synchronize_session=False)
        )
        emit(session, job_id, "requeued", {"reason": error.get("code", "crashed"), "attempt": attempt,
                                           "error": error})
        _book(session, settings, taken, now)
        return "requeued"
    final = {"code": "attempts_exhausted",
             "message": f"the job's process died on each of its {job.attempts} attempts; "
                        f"last: {error.get('message', error.get('code'))}"}
    session.execute(
        update(Job).where(_fenced(job_id, attempt))
        .values(status=JobStatus.failed.value, finished_at=now, lease_owner=None, lease_expires_at=None,
                error=final)
        .execution_options(synchronize_session=False)
    )
    emit(session, job_id, "failed", {"error": final})
    _piece_ended(session, parent, JobStatus.failed.value, now)
    _book(session, settings, taken, now)  # last: the tenant's ledger row is shared by all its runs
    return "failed"


def held_back(session: Session, tenant_id: str) -> tuple[str, str] | None:
    """(id, type) of the tenant's first queued job when the tenant has a ``max_running``, else None.

    A worker woken while the tenant was at its cap found nothing it could take and acked the
    message; when one of the tenant's runs ends, the worker sends a wake-up for this job so that it
    does not wait for the sweeper."""
    cap = session.scalar(select(Tenant.max_running).where(Tenant.id == tenant_id))
    if cap is None:
        return None
    row = session.execute(select(Job.id, Job.type).where(Job.tenant_id == tenant_id, Job.pieces == 0,
                                                         Job.status == JobStatus.queued.value)
                          .order_by(Job.sched_key).limit(1)).first()
    return (row[0], row[1]) if row else None


def cancel_requested(session: Session, job_id: str, attempt: int) -> bool:
    """Read-only: has the user asked this run to stop? Raises LeaseLost if the run lost the job."""
    row = session.execute(select(Job.cancel_requested).where(_fenced(job_id, attempt))).first()
    if row is None:
        raise LeaseLost(job_id)
    return bool(row[0])


def request_cancel(session: Session, job_id: str) -> None:
    """queued -> canceled at once; running -> flag the run, which stops between steps. A spread job:
    its queued pieces are canceled, its running ones flagged, and it ends (canceled) with its last."""
    now = utcnow()
    if session.scalar(select(Job.pieces).where(Job.id == job_id)):
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update())  # parent before pieces
        session.execute(update(Job).where(Job.id == job_id, Job.status.in_(_LIVE)).values(cancel_requested=True)
                        .execution_options(synchronize_session=False))
        _stop_siblings(session, job_id, now)
        settle(session, job_id, now)
        return
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued.value)
        .values(status=JobStatus.canceled.value, finished_at=now, cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:
        emit(session, job_id, "canceled", {})
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running.value)
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )


def fail_exhausted(session: Session, now: datetime | None = None) -> list[str]:
    """Jobs whose lease expired with no attempts left: they killed their worker every time. A piece
    that ends so fails its job (see :func:`_each_parent_first`)."""
    now = now or utcnow()
    where = and_(
        Job.attempts >= Job.max_attempts,
        Job.cancel_requested.is_(False),
        Job.pieces == 0,  # a spread job's own row has no run: its pieces end it
        or_(
            and_(Job.status == JobStatus.running.value, Job.lease_expires_at < now),
            Job.status == JobStatus.queued.value,  # cannot be claimed any more: end it
        ),
    )
    error = {"code": "attempts_exhausted",
             "message": "the job stopped its worker on every attempt (its lease expired each time)"}

    def end(scope) -> list[str]:
        stmt = (
            update(Job)
            .where(where, scope)
            .values(status=JobStatus.failed.value, finished_at=now, lease_owner=None, lease_expires_at=None,
                    error=error)
            .returning(Job.id, Job.attempts)
            .execution_options(synchronize_session=False)
        )
        rows = list(session.execute(stmt))
        for job_id, attempts in rows:
            emit(session, job_id, "failed", {"error": {"code": "attempts_exhausted"}, "attempts": attempts})
        return [r[0] for r in rows]

    return _each_parent_first(session, where, end, JobStatus.failed.value, now)


def cancel_abandoned(session: Session, now: datetime | None = None) -> list[str]:
    """Jobs asked to cancel whose run died (or that were released meanwhile): finish them as canceled."""
    now = now or utcnow()
    where = and_(Job.cancel_requested.is_(True), Job.pieces == 0,
                 or_(and_(Job.status == JobStatus.running.value, Job.lease_expires_at < now),
                     Job.status == JobStatus.queued.value))

    def end(scope) -> list[str]:
        stmt = (
            update(Job)
            .where(where, scope)
            .values(status=JobStatus.canceled.value, finished_at=now, lease_owner=None, lease_expires_at=None)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
        ids = list(session.execute(stmt).scalars())
        for job_id in ids:
            emit(session, job_id, "canceled", {})
        return ids

    return _each_parent_first(session, where, end, JobStatus.canceled.value, now)


def _each_parent_first(session: Session, where, end, status: str, now: datetime) -> list[str]:
    """The sweeper's bulk endings: ``end(scope)`` (one conditional UPDATE) over the jobs that run
    whole, then, per spread job with a piece to end, the same UPDATE over its pieces with the
    parent locked first (the lock order of :func:`lock_parent_of`) and the job settled after."""
    ended = end(Job.parent_id.is_(None))
    parents = session.scalars(select(Job.parent_id).where(where, Job.parent_id.is_not(None)).distinct()).all()
    for parent in parents:
        session.execute(select(Job.id).where(Job.id == parent).with_for_update())
        mine = end(Job.parent_id == parent)
        if mine:
            _piece_ended(session, parent, status, now)
        ended += mine
    return ended


def record_output(session: Session, job_id: str, attempt: int, *, row: int, index: int, seed: int, key: str,
                  width: int, height: int, sha256: str) -> bool:
    """Record one output once (see :func:`record_outputs`). Returns True if this call inserted it."""
    return bool(record_outputs(session, job_id, attempt, [dict(row=row, index=index, seed=seed, key=key, width=width,
                                                              height=height, sha256=sha256)]))


def record_outputs(session: Session, job_id: str, attempt: int, records: list[dict[str, Any]]) -> set[tuple[int, int]]:
    """Record a batch of one job's outputs, each once, in one fenced step: refused (LeaseLost) for
    a fenced-off run; outputs already recorded are left as they are. Emits ``row_done`` for each
    row this call completes. Returns the (row, index) pairs this call inserted.

    ``records``: dicts of row, index, seed, key, width, height, sha256. Five statements a batch
    whatever its size (it was five an image: a quarter of a tiny model's sampling time on CPU).

    ``job_id`` is the row the run holds: for a piece of a spread job the outputs, their count and
    ``row_done`` go to its job (the parent, locked first), fenced by the piece's attempt.
    """
    return _record_outputs(session, job_id, attempt, records)[1]


def _record_outputs(session: Session, job_id: str, attempt: int,
                    records: list[dict[str, Any]]) -> tuple[str, set[tuple[int, int]]]:
    """:func:`record_outputs`, also returning the job the outputs went to (a piece's: its parent)."""
    if not records:
        return job_id, set()
    parent = lock_parent_of(session, job_id)
    # Lock the job row for this transaction so the fencing check and the inserts are one step.
    locked = session.execute(select(Job.id).where(_fenced(job_id, attempt)).with_for_update()).first()
    if locked is None:
        raise LeaseLost(job_id)
    if parent is not None:
        _parent_running(session, parent, utcnow(), {"piece": job_id})
        job_id = parent
    insert_fn = insert_for(session)
    now = utcnow()
    stmt = (
        insert_fn(JobOutput)
        .values([dict(job_id=job_id, attempt=attempt, created_at=now, **r) for r in records])
        .on_conflict_do_nothing(index_elements=["job_id", "row", "index"])
        .returning(JobOutput.row, JobOutput.index)
    )
    inserted = {(r, i) for r, i in session.execute(stmt).all()}
    if not inserted:
        return job_id, inserted
    session.execute(
        update(Job).where(Job.id == job_id).values(outputs_count=Job.outputs_count + len(inserted))
        .execution_options(synchronize_session=False)
    )
    rows = sorted({r for r, _ in inserted})
    wanted = dict(session.execute(select(JobRow.row, JobRow.num_images)
                                  .where(JobRow.job_id == job_id, JobRow.row.in_(rows))).all())
    have = dict(session.execute(select(JobOutput.row, func.count()).where(JobOutput.job_id == job_id,
                                                                          JobOutput.row.in_(rows))
                                .group_by(JobOutput.row)).all())
    for row in rows:
        if wanted.get(row) is not None and have.get(row) == wanted[row]:
            emit(session, job_id, "row_done", {"row": row})
    return job_id, inserted


def record_shard(session: Session, job_id: str, attempt: int, *, shard: int, key: str, sha256: str, size: int,
                 records: list[dict[str, Any]]) -> bool:
    """Record a WebDataset shard and the images in it (``records``, as :func:`record_outputs`
    takes them, each with the shard's ``key``), once, in one fenced step: the images and their
    shard are recorded together or not at all, so a retry's ``done`` set holds whole shards only
    and it rebuilds exactly the shards not recorded. Returns True if this call recorded the shard.
    ``job_id`` is the row the run holds: for a piece of a spread job the shard is its job's, as
    its images are (:func:`record_outputs`)."""
    owner, _ = _record_outputs(session, job_id, attempt, records)  # locks the job's row and checks the fence
    insert_fn = insert_for(session)
    stmt = (
        insert_fn(JobShard)
        .values(job_id=owner, shard=shard, key=key, sha256=sha256, bytes=size, images=len(records),
                attempt=attempt, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["job_id", "shard"])
        .returning(JobShard.shard)
    )
    return session.execute(stmt).first() is not None


def shards_of(session: Session, job_id: str) -> list[JobShard]:
    """A job's recorded WebDataset shards, in shard order."""
    return list(session.scalars(select(JobShard).where(JobShard.job_id == job_id).order_by(JobShard.shard)))


def outputs_with_rows(session: Session, job_id: str) -> list[tuple[JobOutput, JobRow]]:
    """A job's outputs in (row, index) order, each with the CSV/JSON row it was made for (its
    prompt and negative prompt): what the outputs listing and the manifest both show."""
    return [tuple(r) for r in session.execute(
        select(JobOutput, JobRow)
        .join(JobRow, and_(JobRow.job_id == JobOutput.job_id, JobRow.row == JobOutput.row))
        .where(JobOutput.job_id == job_id)
        .order_by(JobOutput.row, JobOutput.index)
    ).all()]


def mark_enqueued(session: Session, job_ids: list[str], now: datetime | None = None) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(enqueued_at=now or utcnow())
                        .execution_options(synchronize_session=False))


@dataclass(frozen=True)
class SweepCandidate:
    job_id: str
    type: str
    status: str
    enqueued_at: datetime | None
    tenant_id: str = ""


def sweep_candidates(session: Session, now: datetime | None = None) -> list[SweepCandidate]:
    """Every job that should be in the broker: queued ones, and running ones whose lease expired
    with attempts left (their worker died). The sweeper asks the broker which it still holds.
    Expired leases first (the claim takes them first), then in queue order (``sched_key``)."""
    now = now or utcnow()
    rows = session.execute(
        select(Job.id, Job.type, Job.status, Job.enqueued_at, Job.tenant_id).where(
            or_(
                and_(Job.status == JobStatus.running.value, Job.lease_expires_at < now,
                     Job.attempts < Job.max_attempts, Job.cancel_requested.is_(False)),
                and_(Job.status == JobStatus.queued.value, Job.attempts < Job.max_attempts),
            ),
            Job.pieces == 0,  # a spread job is woken through its pieces
        ).order_by(Job.status.desc(), Job.sched_key)
    ).all()
    return [SweepCandidate(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def free_slots(session: Session, now: datetime | None = None) -> dict[str, int]:
    """For each tenant with a ``max_running``: how many more runs it may start now (≥ 0)."""
    now = now or utcnow()
    live = (select(Job.tenant_id, func.count().label("n"))
            .where(Job.status == JobStatus.running.value, Job.lease_expires_at >= now)
            .group_by(Job.tenant_id).subquery())
    rows = session.execute(select(Tenant.id, Tenant.max_running, func.coalesce(live.c.n, 0))
                           .outerjoin(live, live.c.tenant_id == Tenant.id)
                           .where(Tenant.max_running.is_not(None))).all()
    return {tid: max(0, cap - n) for tid, cap, n in rows}

