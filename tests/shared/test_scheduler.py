"""The claim policy against the real Postgres (and the embedded SQLite): fair share by weight over
decayed usage, priority then age with aging, max_running, expired leases first, one job per claim
under concurrency."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from shared import jobstate, scheduler
from shared.db import session_scope
from shared.models import Job, JobEvent, Tenant, TenantUsage, utcnow
from tests.conftest import cancel_unfinished_jobs

AGING = 300.0  # shared.catalog.SCHED_AGING_S_DEFAULT: the key a job gets without the API


@pytest.fixture(autouse=True)
def empty_queue(settings):
    """The claim takes the best job of *any* tenant: start each test with no other test's queue."""
    cancel_unfinished_jobs(settings.database_url)
    yield


@pytest.fixture
def tenant(settings, make_tenant):
    def _make(weight: float = 1.0, max_running: int | None = None, usage_s: float = 0.0) -> str:
        tid, _ = make_tenant()
        with session_scope(settings) as s:
            s.execute(update(Tenant).where(Tenant.id == tid).values(weight=weight, max_running=max_running))
            if usage_s:
                s.add(TenantUsage(tenant_id=tid, usage_s=usage_s, updated_s=utcnow().timestamp()))
        return tid
    return _make


def submit(settings, tenant_id: str, *, priority: int = 0, age_s: float = 0.0, type_: str = "sample") -> str:
    with session_scope(settings) as s:
        job = Job(tenant_id=tenant_id, type=type_, params={}, priority=priority,
                  created_at=utcnow() - timedelta(seconds=age_s))
        s.add(job)
        s.flush()
        return job.id


def claim_next(settings, owner: str = "w", type_: str = "sample", now=None, lease_s: float = 30):
    with session_scope(settings) as s:
        return jobstate.claim_next(s, settings, type_, owner, lease_s, now=now)


def claimed_ids(settings, n: int) -> list[str]:
    out = []
    for i in range(n):
        c = claim_next(settings, f"w{i}")
        out.append(c.job_id if c else None)
    return out


def test_within_a_tenant_priority_first_then_oldest(settings, tenant):
    t = tenant()
    old0 = submit(settings, t, age_s=20)
    new0 = submit(settings, t, age_s=10)
    high = submit(settings, t, priority=5)
    low = submit(settings, t, priority=-3, age_s=30)
    assert claimed_ids(settings, 5) == [high, old0, new0, low, None]


def test_aging_a_long_wait_outranks_later_higher_priority(settings, tenant):
    t = tenant()
    high = submit(settings, t, priority=10)
    # Ten levels behind, but it waited more than ten aging periods: ahead.
    patient = submit(settings, t, priority=0, age_s=10 * AGING + 60)
    # Ten levels behind and waited a little less than that: still behind.
    recent = submit(settings, t, priority=0, age_s=10 * AGING - 60)
    assert claimed_ids(settings, 3) == [patient, high, recent]


def test_only_the_woken_queue_type_is_claimed(settings, tenant):
    t = tenant()
    train = submit(settings, t, type_="train", age_s=100)
    sample = submit(settings, t)
    assert claim_next(settings, type_="sample").job_id == sample
    assert claim_next(settings, type_="sample") is None
    assert claim_next(settings, type_="train").job_id == train


def test_lowest_usage_per_weight_goes_first(settings, tenant):
    heavy = tenant(usage_s=1000.0)
    light = tenant(usage_s=10.0)
    a = submit(settings, heavy, age_s=100)  # older, higher priority: order inside a tenant only
    b = submit(settings, light)
    assert claimed_ids(settings, 2) == [b, a]


def test_weight_divides_usage(settings, tenant):
    # 1000 s at weight 20 (50 per unit of weight) is less than 100 s at weight 1.
    big = tenant(weight=20, usage_s=1000.0)
    small = tenant(weight=1, usage_s=100.0)
    b = submit(settings, small, age_s=100)
    a = submit(settings, big)
    assert claimed_ids(settings, 2) == [a, b]


def test_running_jobs_count_so_free_workers_spread_by_weight(settings, tenant):
    """No usage yet: claims alternate between equal tenants, and go 2:1 to a weight-2 tenant."""
    a, b = tenant(weight=2), tenant(weight=1)
    jobs = {submit(settings, a, age_s=100 - i): "a" for i in range(6)}
    jobs.update({submit(settings, b, age_s=50 - i): "b" for i in range(6)})
    got = [jobs[j] for j in claimed_ids(settings, 6)]
    assert got.count("a") == 4 and got.count("b") == 2, got


def test_usage_decays_by_half_life(settings, tenant):
    t = tenant()
    now = utcnow()
    with session_scope(settings) as s:
        scheduler.charge(s, settings, t, 100.0, now.timestamp())
    later = now + timedelta(seconds=settings.sched_half_life_s)
    with session_scope(settings) as s:
        assert scheduler.standings(s, settings, later)[t] == pytest.approx(50.0, rel=1e-6)
        # A second charge adds to the decayed value.
        scheduler.charge(s, settings, t, 10.0, later.timestamp())
        row = s.get(TenantUsage, t)
        assert row.usage_s == pytest.approx(60.0, rel=1e-6) and row.updated_s == pytest.approx(later.timestamp())


def test_heartbeat_and_end_charge_the_run_time(settings, tenant):
    t = tenant()
    submit(settings, t)
    now = utcnow()
    c = claim_next(settings, now=now)
    with session_scope(settings) as s:
        jobstate.heartbeat(s, c.job_id, c.attempt, 30, now=now + timedelta(seconds=10), settings=settings)
    with session_scope(settings) as s:
        assert s.get(TenantUsage, t).usage_s == pytest.approx(10.0, abs=0.01)
        # The standing counts the charged time, the time since, and the running job's reserve.
        score = scheduler.standings(s, settings, now + timedelta(seconds=15))[t]
        assert score == pytest.approx(10.0 * 0.5 ** (5 / settings.sched_half_life_s) + 5.0
                                      + settings.sched_running_charge_s, abs=0.05)
    with session_scope(settings) as s, pytest.raises(jobstate.LeaseLost):  # a stale run charges nothing
        jobstate.heartbeat(s, c.job_id, c.attempt + 1, 30, settings=settings)
    with session_scope(settings) as s:
        jobstate.finish(s, c.job_id, c.attempt, jobstate.JobStatus.succeeded, settings=settings)
    with session_scope(settings) as s:  # the end charges up to now (the clock went back 10 s: nothing)
        assert s.get(TenantUsage, t).usage_s == pytest.approx(10.0, abs=0.5)
        assert scheduler.standings(s, settings, utcnow())[t] == pytest.approx(10.0, abs=0.5)


def test_each_claim_writes_one_started_event_with_its_attempt_and_worker(settings, tenant):
    """On PostgreSQL the claim statement writes the event itself (one round trip fewer a claim)."""
    job = submit(settings, tenant())
    now = utcnow()
    first = claim_next(settings, "w1", now=now, lease_s=5)
    again = claim_next(settings, "w2", now=now + timedelta(seconds=10))  # the lease expired: re-claimed
    assert (first.job_id, again.job_id, again.attempt) == (job, job, 2)
    assert started_events(settings, job) == [{"attempt": 1, "worker": "w1"}, {"attempt": 2, "worker": "w2"}]


def started_events(settings, job_id: str) -> list[dict]:
    with session_scope(settings) as s:
        return list(s.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "started")
                              .order_by(JobEvent.id)))


def test_a_beat_whose_charge_cursor_moved_renews_the_lease_without_charging_again(settings, tenant):
    """The beat's UPDATE takes the charge only if the cursor is where it read it; if another charge
    (a co-batching split) moved it in between, the lease is renewed and nothing is charged twice."""
    t = tenant()
    submit(settings, t)
    now = utcnow()
    c = claim_next(settings, now=now)
    with session_scope(settings) as s:
        run = jobstate._run_row(s, c.job_id, c.attempt)
    with session_scope(settings) as s:  # another charge took the interval first
        s.execute(update(Job).where(Job.id == c.job_id).values(charged_s=Job.charged_s + 5))
    expires = now + timedelta(seconds=40)
    with session_scope(settings) as s:
        row, taken = jobstate._update_taking_charge(s, c.job_id, c.attempt, run, now + timedelta(seconds=10),
                                                    {"lease_expires_at": expires}, returning=(Job.cancel_requested,))
        assert row is not None and taken is None
    with session_scope(settings) as s:
        job = s.get(Job, c.job_id)
        assert job.lease_expires_at == expires and job.charged_s == pytest.approx(now.timestamp() + 5)
        row, taken = jobstate._update_taking_charge(s, c.job_id, c.attempt + 1, run, now, {"lease_expires_at": expires},
                                                    returning=(Job.cancel_requested,))
        assert (row, taken) == (None, None)  # a stale run renews nothing


def test_a_tenant_at_max_running_is_skipped(settings, tenant):
    capped = tenant(max_running=1)
    first = submit(settings, capped, age_s=10)
    second = submit(settings, capped)
    assert claim_next(settings).job_id == first
    assert claim_next(settings) is None  # its only other job waits for the running one
    other = tenant(usage_s=1e6)  # far behind on fair share, but eligible
    o = submit(settings, other)
    assert claim_next(settings).job_id == o
    with session_scope(settings) as s:  # a claim by id (a co-batched companion) obeys it too
        assert jobstate.claim(s, second, "w", 30) is None


def test_an_expired_lease_is_reclaimed_first_with_the_next_attempt(settings, tenant):
    t = tenant()
    dead = submit(settings, t, age_s=100)
    now = utcnow()
    c1 = claim_next(settings, now=now, lease_s=5)
    assert c1.job_id == dead
    fresh = submit(settings, tenant())  # another tenant with no usage at all
    c2 = claim_next(settings, now=now + timedelta(seconds=10))
    assert (c2.job_id, c2.attempt) == (dead, 2)
    assert claim_next(settings, now=now + timedelta(seconds=10)).job_id == fresh
    with session_scope(settings) as s, pytest.raises(jobstate.LeaseLost):  # the dead run is fenced off
        jobstate.set_progress(s, dead, c1.attempt, 0.5)


def test_no_attempts_left_or_cancel_requested_is_never_claimed(settings, tenant):
    t = tenant()
    spent = submit(settings, t, age_s=10)
    canceled = submit(settings, t, age_s=5)
    with session_scope(settings) as s:
        s.execute(update(Job).where(Job.id == spent).values(attempts=3, max_attempts=3))
        s.execute(update(Job).where(Job.id == canceled).values(cancel_requested=True))
    assert claim_next(settings) is None


def test_concurrent_claims_take_distinct_jobs(settings, tenant):
    tenants = [tenant() for _ in range(3)]
    ids = {submit(settings, tenants[i % 3], age_s=i) for i in range(24)}
    got: list[str] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        while True:
            c = claim_next(settings, f"t{n}")
            if c is None:
                return
            with lock:
                got.append(c.job_id)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert sorted(got) == sorted(ids)  # every job once, none twice


def test_first_claim_reports_the_queue_wait(settings, tenant):
    t = tenant()
    submit(settings, t, priority=3, age_s=42)
    c = claim_next(settings)
    assert c.priority == 3 and c.waited_s == pytest.approx(42, abs=2)


def test_the_same_policy_on_sqlite(tmp_path, make_tenant, settings):
    """The embedded default (``ldmq demo``) claims with the same policy, without LATERAL or locks."""
    from migrations import upgrade

    lite = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'q.db'}"})
    upgrade(lite.database_url)
    with session_scope(lite) as s:
        s.add_all([Tenant(id="a" * 32, name="a", weight=1.0), Tenant(id="b" * 32, name="b", weight=1.0)])
        s.add(TenantUsage(tenant_id="a" * 32, usage_s=500.0, updated_s=utcnow().timestamp()))
    a_old = submit(lite, "a" * 32, age_s=100)
    b_low = submit(lite, "b" * 32, priority=-1, age_s=10)
    b_high = submit(lite, "b" * 32, priority=2)
    now = utcnow()
    first = claim_next(lite, now=now, lease_s=5)
    assert first.job_id == b_high and first.waited_s is not None
    assert claim_next(lite, now=now).job_id == b_low
    assert claim_next(lite, now=now).job_id == a_old
    again = claim_next(lite, now=now + timedelta(seconds=10))  # b_high's lease expired: re-claimed
    assert (again.job_id, again.attempt) == (b_high, 2)
    assert started_events(lite, b_high) == [{"attempt": 1, "worker": "w"}, {"attempt": 2, "worker": "w"}]
    with session_scope(lite) as s:
        jobstate.heartbeat(s, again.job_id, again.attempt, 30, now=now + timedelta(seconds=20), settings=lite)
        assert s.get(TenantUsage, "b" * 32).usage_s == pytest.approx(10.0, abs=0.01)
    by_id = submit(lite, "a" * 32)  # a claim by id (a co-batched companion), the cap read with it
    with session_scope(lite) as s:
        s.execute(update(Tenant).where(Tenant.id == "a" * 32).values(max_running=2))
        assert jobstate.claim(s, by_id, "w", 30).attempt == 1


# -- preemption at checkpoints (scheduler.preemption) ---------------------------------------------

AFTER = 30.0  # LDMQ_PREEMPT_AFTER_S in these tests


def on(settings):
    return settings.model_copy(update={"preempt_after_s": AFTER})


def run_train(settings, tenant_id: str, *, priority: int = 0, age_s: float = 0.0):
    """A train job of the tenant, claimed (running): (job id, attempt)."""
    job = submit(settings, tenant_id, priority=priority, age_s=age_s, type_="train")
    c = claim_next(settings, type_="train")
    assert c.job_id == job
    return job, c.attempt


def should_yield(settings, job_id: str, attempt: int, ran_s: float = 10 * AFTER, now=None):
    with session_scope(settings) as s:
        return scheduler.preemption(s, settings, job_id, attempt, "train", ran_s, now or utcnow())


def test_preemption_is_off_by_default(settings, tenant):
    assert not settings.preempt_after_s
    t = tenant()
    job, attempt = run_train(settings, t)
    submit(settings, t, priority=10, age_s=10 * AFTER, type_="train")
    assert should_yield(settings, job, attempt) is None
    assert should_yield(on(settings), job, attempt) is not None


def test_the_tenants_higher_priority_job_preempts_once_it_has_waited(settings, tenant):
    s = on(settings)
    t = tenant()
    job, attempt = run_train(s, t)
    urgent = submit(s, t, priority=5, age_s=AFTER - 5, type_="train")
    assert should_yield(s, job, attempt) is None  # waited 25 s of 30
    got = should_yield(s, job, attempt, now=utcnow() + timedelta(seconds=10))
    assert got is not None and (got.waiting_job_id, got.reason) == (urgent, "priority")
    assert got.waited_s == pytest.approx(AFTER + 5, abs=2)
    assert should_yield(s, job, attempt, ran_s=AFTER - 1) is None  # a run is not sent back before it ran that long
    assert should_yield(s, job, attempt + 1) is None  # not this run's any more (fenced)


def test_equal_or_lower_priority_or_an_aged_run_is_not_preempted(settings, tenant):
    s = on(settings)
    t = tenant()
    job, attempt = run_train(s, t, priority=2)
    submit(s, t, priority=2, age_s=10 * AFTER, type_="train")  # same priority, even if it waited
    submit(s, t, priority=-1, age_s=10 * AFTER, type_="train")
    assert should_yield(s, job, attempt) is None
    # Aging: the running job was submitted 3 aging periods before an urgent one 2 levels above it,
    # so the claim would put it first again: no preemption.
    t2 = tenant()
    old, old_attempt = run_train(s, t2, age_s=3 * AGING)
    submit(s, t2, priority=2, age_s=2 * AFTER, type_="train")
    assert should_yield(s, old, old_attempt) is None


def test_an_under_served_tenant_preempts_a_heavier_ones_run(settings, tenant):
    s = on(settings)
    heavy = tenant(usage_s=5000.0)
    job, attempt = run_train(s, heavy)
    light = tenant(usage_s=100.0)
    waiting = submit(s, light, age_s=2 * AFTER, type_="train")
    got = should_yield(s, job, attempt)
    assert (got.waiting_job_id, got.reason) == (waiting, "fair_share")
    # A tenant that has used more than the running one (per weight) does not.
    with session_scope(s) as ses:
        ses.execute(update(TenantUsage).where(TenantUsage.tenant_id == light).values(usage_s=9000.0))
    assert should_yield(s, job, attempt) is None
    # ... unless its weight makes it the under-served one: 9000 / 4 < 5000 + the run's time.
    with session_scope(s) as ses:
        ses.execute(update(Tenant).where(Tenant.id == light).values(weight=4.0))
    assert should_yield(s, job, attempt).reason == "fair_share"


def test_one_waiting_job_makes_only_the_last_ranked_run_yield(settings, tenant):
    s = on(settings)
    t = tenant()
    first, a1 = run_train(s, t, priority=3)
    second, a2 = run_train(s, t, priority=1)
    submit(s, t, priority=5, age_s=2 * AFTER, type_="train")
    assert should_yield(s, first, a1) is None  # the other run is the one the policy would drop
    assert should_yield(s, second, a2).reason == "priority"


def test_a_tenant_at_max_running_still_preempts_its_own_run(settings, tenant):
    """Its cap counts the run that would yield: the slot it frees is the tenant's."""
    s = on(settings)
    t = tenant(max_running=1)
    job, attempt = run_train(s, t)
    urgent = submit(s, t, priority=5, age_s=2 * AFTER, type_="train")
    assert should_yield(s, job, attempt).waiting_job_id == urgent


def test_only_work_of_the_runs_type_counts(settings, tenant):
    s = on(settings)
    t = tenant()
    job, attempt = run_train(s, t)
    submit(s, t, priority=5, age_s=2 * AFTER)  # a sample job: another queue's workers take it
    assert should_yield(s, job, attempt) is None


def test_preemption_on_sqlite(tmp_path, make_tenant, settings):
    from migrations import upgrade

    lite = on(settings).model_copy(update={"database_url": f"sqlite:///{tmp_path / 'q.db'}"})
    upgrade(lite.database_url)
    with session_scope(lite) as s:
        s.add_all([Tenant(id="a" * 32, name="a", weight=1.0), Tenant(id="b" * 32, name="b", weight=1.0)])
        s.add(TenantUsage(tenant_id="a" * 32, usage_s=500.0, updated_s=utcnow().timestamp()))
    job, attempt = run_train(lite, "a" * 32)
    urgent = submit(lite, "a" * 32, priority=3, age_s=2 * AFTER, type_="train")
    assert should_yield(lite, job, attempt).waiting_job_id == urgent
    other = submit(lite, "b" * 32, age_s=3 * AFTER, type_="train")  # an idle tenant goes first
    got = should_yield(lite, job, attempt)
    assert (got.waiting_job_id, got.reason) == (other, "fair_share")


def _held_or_done(settings, thread: threading.Thread, deadline_s: float = 30.0) -> None:
    """Wait until ``thread``'s claim has ended or waits on a lock held by another session (what a
    second claim for a tenant at its cap does while the first one's transaction is open)."""
    import time

    from sqlalchemy import text

    end = time.monotonic() + deadline_s
    while thread.is_alive() and time.monotonic() < end:
        with session_scope(settings) as s:
            if s.scalar(text("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                             " WHERE NOT l.granted AND d.datname = current_database()")):
                return
        thread.join(0.02)
    assert time.monotonic() < end, "the second claim neither ended nor waited"


@pytest.mark.parametrize("by_id", [False, True], ids=["claim_next", "claim_by_id"])
def test_max_running_holds_when_two_claims_overlap(settings, tenant, by_id):
    """Two workers' claims for a tenant at ``max_running`` - 1 overlap: the first one's transaction
    is still open when the second one counts the tenant's running jobs (READ COMMITTED: its
    statement cannot see the first claim). The second must not start a job over the cap."""
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer: claims never overlap")
    from shared.db import abort, finish, new_session

    capped = tenant(max_running=1)
    first_id = submit(settings, capped, age_s=10)
    second_id = submit(settings, capped)
    first = new_session(settings)
    try:
        c1 = jobstate.claim_next(first, settings, "sample", "w1", 30)
        assert c1.job_id == first_id
        got: dict = {}

        def second() -> None:
            try:
                with session_scope(settings) as s:
                    got["claim"] = (jobstate.claim(s, second_id, "w2", 30) if by_id
                                    else jobstate.claim_next(s, settings, "sample", "w2", 30))
            except jobstate.TenantAtCap as exc:
                got["claim"] = exc

        th = threading.Thread(target=second)
        th.start()
        _held_or_done(settings, th)
    except BaseException:
        abort(first)
        raise
    finish(first)
    th.join(30)
    assert not th.is_alive()
    assert got["claim"] is None or isinstance(got["claim"], jobstate.TenantAtCap), got
    with session_scope(settings) as s:
        running = s.scalars(select(Job.id).where(Job.tenant_id == capped, Job.status == "running")).all()
        assert running == [first_id]
        assert s.get(Job, second_id).attempts == 0  # the undone claim left no trace
    assert started_events(settings, second_id) == []  # not even its event, written by the claim statement
    assert claim_next(settings) is None  # a later claim sees the tenant at its cap


def test_racing_workers_never_run_a_tenant_over_max_running(settings, tenant):
    """Many workers woken at once, each claiming through the worker's path (its own session, the
    retry after a lost race): the capped tenant runs exactly its cap, and the workers that lost its
    slots take the other tenant's work instead of idling."""
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer: claims never overlap")
    from tests.conftest import race
    from worker.runtime.run import claim_next_run

    capped = tenant(max_running=2)  # ranked first: no usage and weight 100
    with session_scope(settings) as s:
        s.execute(update(Tenant).where(Tenant.id == capped).values(weight=100.0))
    other = tenant(usage_s=1e3)
    for i in range(12):
        submit(settings, capped, age_s=i)
    for i in range(12):
        submit(settings, other, age_s=i)
    runs = race(12, lambda: claim_next_run(settings, "sample", owner="racer"))
    assert all(r is not None for r in runs)
    with session_scope(settings) as s:
        running = dict(s.execute(select(Job.tenant_id, func.count()).where(Job.status == "running")
                                 .group_by(Job.tenant_id)).all())
        assert running == {capped: 2, other: 10}
        assert s.scalar(select(func.count()).where(Job.tenant_id == capped, Job.attempts > 0)) == 2  # none undone left a trace


def test_jobs_sharing_one_batch_run_are_charged_its_time_once_split_by_images(settings, tenant):
    """A sample run packing another tenant's job into its batches: together they are charged the
    run's time once (3:1 by images), in the ledger and in the claim's in-flight term."""
    lead_t, packed_t = tenant(), tenant()
    lead_id, packed_id = submit(settings, lead_t), submit(settings, packed_t)
    now = utcnow()
    with session_scope(settings) as s:
        lead = jobstate.claim(s, lead_id, "w", 60, now=now)
        packed = jobstate.claim(s, packed_id, "w", 60, now=now)
        jobstate.share_charge(s, [(lead_id, lead.attempt, 3), (packed_id, packed.attempt, 1)], settings, now=now)
    with session_scope(settings) as s:  # 8 s into the shared run: 6 s and 2 s in flight (+ the reserve)
        score = scheduler.standings(s, settings, now + timedelta(seconds=8))
        reserve = settings.sched_running_charge_s
        assert (score[lead_t], score[packed_t]) == (pytest.approx(6 + reserve), pytest.approx(2 + reserve))
    for job_id, c in ((lead_id, lead), (packed_id, packed)):
        with session_scope(settings) as s:
            jobstate.heartbeat(s, job_id, c.attempt, 60, now=now + timedelta(seconds=8), settings=settings)
    with session_scope(settings) as s:
        assert s.get(TenantUsage, lead_t).usage_s == pytest.approx(6.0, abs=0.01)
        assert s.get(TenantUsage, packed_t).usage_s == pytest.approx(2.0, abs=0.01)
    with session_scope(settings) as s:  # a claim of its own charges a job in full again
        jobstate.release(s, packed_id, packed.attempt, settings=settings)
    with session_scope(settings) as s:
        again = jobstate.claim(s, packed_id, "w", 60)
        assert s.get(Job, packed_id).charge_share == 1.0 and again is not None
