"""``ldmq bench scheduler``: the claim path and the scheduling policy under hundreds of workers.

Simulated workers are threads running the real ``shared.jobstate`` code (``claim_next``,
``heartbeat``, ``finish``) against a real PostgreSQL database the bench creates and drops; each
"computes" a claimed job (one piece of work) by sleeping ``--piece-s``, heartbeating every
``--heartbeat-s`` meanwhile (which charges its tenant's fair-share usage, as a worker does). A
worker that finds nothing waits for a wake-up (a submit signals one, as a Celery message would).

Three parts, printed in one run:

1. **scale**: 10⁵ and 10⁶ queued jobs (bulk-inserted server-side with ``INSERT … SELECT
   generate_series``), 64 and 256 workers: claims/s, claim latency p50/p99 (the whole call a
   worker makes: pool checkout, the claim statement (its UPDATE and its event row), the commit; the
   pool wait and the statement's round trip apart), worker utilisation, and EXPLAIN ANALYZE of the
   claim with 256 running. The simulated workers are threads, ``--threads-per-proc`` (64) to a
   process (256 workers: 4 processes, :class:`ProcessFleet`), since real workers are processes
   and one interpreter's GIL could not issue 256 workers' claims. A *probe*, a worker process of
   its own, claims beside them every 50 ms: its latency is what one ``ldmq worker`` sees while the
   others load the database, and the target is read from it.
2. **fairness**: three tenants with weights 1:2:4, each with a deep backlog: each one's share of
   the GPU-seconds against its weight, and Jain's index over the weighted shares
   ``(Σx)² / (n·Σx²)``, ``x = share / weight share`` (1.0: exactly by weight).
3. **flood**: one tenant floods; two others submit one small job every ``--small-every-s``; mid-run
   the flooding tenant submits a burst of priority-10 jobs. Small-job waits (submit → claim)
   p50/p95 under the flood against the same submissions on an idle cluster, and the burst's wait.

Targets (issue 15): claim p99 < 25 ms at 256 workers and 10⁶ queued; utilisation ≥ 95 % while
work is queued; Jain ≥ 0.95; small-job p95 wait under a flood ≤ one piece + 1 s.

The database connections are a pool of ``--pool`` (checked against the server's
``max_connections`` less those in use): a worker holds one only for a statement, so 256 workers
share a few dozen, as they would share a pgbouncer.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldmq bench scheduler", description=__doc__.split("\n\n")[0])
    p.add_argument("--pg", default=os.environ.get("LDMQ_BENCH_PG", ADMIN_URL),
                   help="a PostgreSQL URL whose user may CREATE DATABASE (a fresh one is made and dropped)")
    p.add_argument("--workers", default="64,256", help="simulated worker counts for the scale part")
    p.add_argument("--queued", default="100000,1000000", help="queued jobs for the scale part")
    p.add_argument("--piece-s", type=float, default=2.0, help="seconds one piece of work takes (the design "
                   "range is seconds to a minute; the shorter, the more the claim path weighs)")
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="heartbeat interval while computing")
    p.add_argument("--run-s", type=float, default=30.0, help="seconds each scale run lasts (30: ~500 claims of the "
                   "probe, so that its p99 is not one short stall of the machine; 15 s windows gave ~250)")
    p.add_argument("--fair-s", type=float, default=40.0, help="seconds of the fairness part")
    p.add_argument("--fair-workers", type=int, default=64)
    p.add_argument("--flood-s", type=float, default=30.0, help="seconds of the flood part (and of its idle baseline)")
    p.add_argument("--flood-workers", type=int, default=64)
    p.add_argument("--small-every-s", type=float, default=0.5, help="a small job every this many seconds")
    p.add_argument("--burst", type=int, default=20, help="priority-10 jobs the flooding tenant submits mid-flood")
    p.add_argument("--threads-per-proc", type=int, default=64, help="simulated workers per process in the scale "
                   "part (256 workers: 4 processes), as real workers are processes, not threads of one interpreter")
    p.add_argument("--pool", type=int, default=40, help="database connections the workers share (at most)")
    p.add_argument("--quick", action="store_true", help="a smoke run at tiny scale (seconds; for the test suite)")
    p.add_argument("--keep-db", action="store_true", help="do not drop the bench database")
    return p


QUICK = dict(workers="4,8", queued="2000,5000", piece_s=0.1, heartbeat_s=0.05, run_s=1.5, fair_s=4.0,
             fair_workers=8, flood_s=2.5, flood_workers=6, small_every_s=0.1, burst=4, pool=8, threads_per_proc=4)


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``xs``; NaN when empty."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100.0 * len(s) + 0.5)) - 1))]


def jain(xs: list[float]) -> float:
    """Jain's fairness index of ``xs``: 1 when all equal, 1/n when one takes everything."""
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if xs and any(xs) else float("nan")


# -- the database -------------------------------------------------------------------------------

class BenchDb:
    """A fresh database, migrated to head, dropped on exit (unless kept)."""

    def __init__(self, admin_url: str, keep: bool = False):
        self.admin_url, self.keep = admin_url, keep
        self.name = f"ldmq_bench_sched_{uuid.uuid4().hex[:8]}"
        self.url = admin_url.rsplit("/", 1)[0] + f"/{self.name}"

    def __enter__(self) -> BenchDb:
        from sqlalchemy import create_engine, text

        from migrations import upgrade

        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{self.name}"'))
        admin.dispose()
        upgrade(self.url)
        return self

    def __exit__(self, *exc) -> None:
        from sqlalchemy import create_engine, text

        if self.keep:
            print(f"(database kept: {self.url})")
            return
        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        admin.dispose()


def reset(engine) -> None:
    from sqlalchemy import text

    with engine.begin() as c:
        c.execute(text("TRUNCATE tenants, jobs, job_events, tenant_usage CASCADE"))


def make_tenants(engine, weights: list[float]) -> list[str]:
    from sqlalchemy import text

    ids = [uuid.uuid4().hex for _ in weights]
    with engine.begin() as c:
        for tid, w in zip(ids, weights):
            c.execute(text("INSERT INTO tenants (id, name, weight, created_at) VALUES (:id, :id, :w, now())"),
                      {"id": tid, "w": w})
    return ids


def bulk_queue(engine, tenants: list[str], n: int, *, aging_s: float, priority_mod: int = 1) -> float:
    """``n`` queued one-piece sample jobs spread over ``tenants``, oldest first, in one server-side
    INSERT … SELECT (10⁶ rows: seconds, no client round trips), then VACUUM ANALYZE. Returns seconds."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    t0 = time.perf_counter()
    with engine.begin() as c:
        c.execute(text("""
            INSERT INTO jobs (id, tenant_id, type, status, priority, params, progress, progress_detail, total_items,
                              outputs_count, created_at, enqueued_at, attempts, max_attempts, cancel_requested,
                              sched_key)
            SELECT md5(:salt || g::text), (CAST(:tenants AS text[]))[1 + g % :nt], 'sample', 'queued', g % :pm, '{}', 0, '{}', 1, 0,
                   now() - make_interval(secs => (:n - g) * 0.001), now(), 0, 3, false,
                   extract(epoch FROM now() - make_interval(secs => (:n - g) * 0.001)) - (g % :pm) * :aging
            FROM generate_series(1, :n) AS g"""),
                  {"salt": uuid.uuid4().hex, "tenants": tenants, "nt": len(tenants), "n": n, "pm": priority_mod,
                   "aging": aging_s})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("VACUUM ANALYZE jobs"))
        # Write the load's dirty pages out now (10⁶ rows and their indexes), or the checkpoint it calls
        # for lands in a measured window: its writes and fsyncs were the suspect when two runs of one
        # setting gave a worker's claim p99 of 45 ms and 15 ms.
        # Needs superuser or pg_checkpoint; without, the figures carry that noise.
        try:
            c.execute(text("CHECKPOINT"))
        except DBAPIError:
            print("(no CHECKPOINT after the load: this user may not; a checkpoint may fall in a measured window)")
    return time.perf_counter() - t0


# -- the simulated fleet --------------------------------------------------------------------------

@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)  # seconds per claim call (found a job)
    stmt: list[float] = field(default_factory=list)  # seconds of the claim statement's round trip alone
    pool_waits: list[float] = field(default_factory=list)
    empty: int = 0  # claim calls that found nothing
    busy: dict[str, float] = field(default_factory=dict)  # tenant -> seconds computed (inside the window)
    waits: dict[str, list[float]] = field(default_factory=dict)  # tenant -> first-claim waits
    prio_waits: dict[int, list[float]] = field(default_factory=dict)
    claims: int = 0


class Fleet:
    """``n`` worker threads claiming, computing (sleeping) and finishing jobs until stopped."""

    def __init__(self, engine, settings, n: int, piece_s: float, heartbeat_s: float):
        from sqlalchemy import event
        from sqlalchemy.orm import sessionmaker

        self.engine, self.settings, self.n = engine, settings, n
        self.piece_s, self.heartbeat_s = piece_s, heartbeat_s
        self.Session = sessionmaker(bind=engine, expire_on_commit=False)
        self.stats = Stats()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.wake = threading.Semaphore(0)  # a Celery message, in effect
        self.window = (0.0, float("inf"))
        self._checkout = threading.local()
        event.listen(engine, "checkout", self._on_checkout)
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(n)]

    def _on_checkout(self, *_a) -> None:
        self._checkout.at = time.perf_counter()

    def _before(self, conn, _cursor, statement, *_a) -> None:
        if statement.lstrip().startswith("WITH"):  # the claim statement
            conn.info["ldmq_bench_t0"] = time.perf_counter()

    def _after(self, conn, _cursor, statement, *_a) -> None:
        t0 = conn.info.pop("ldmq_bench_t0", None)
        if t0 is not None:
            self._checkout.stmt = time.perf_counter() - t0

    def start(self) -> Fleet:
        for t in self.threads:
            t.start()
        return self

    def measure(self, seconds: float, start: float | None = None) -> Stats:
        """Reset the figures, let the fleet run ``seconds`` from ``start`` (a ``time.monotonic()``
        instant, the same clock in every process on Linux; default now), return what happened in
        that window: claims made in it, and the part of every piece computed in it (so the figures
        wait for the pieces still running when the window closes to report their share)."""
        start = time.monotonic() if start is None else start
        with self.lock:
            self.stats = Stats()
            self.window = (start, start + seconds)
        time.sleep(max(0.0, start - time.monotonic()) + seconds + self.piece_s + 0.5)
        with self.lock:
            return self.stats

    def _in_window(self, t: float) -> bool:
        lo, hi = self.window
        return lo <= t <= hi

    def close(self) -> None:
        from sqlalchemy import event

        self.stop.set()
        for _ in self.threads:
            self.wake.release()
        for t in self.threads:
            t.join(30)
        event.remove(self.engine, "checkout", self._on_checkout)
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)

    def _claim(self, owner: str):
        from shared import jobstate

        t0 = time.perf_counter()
        self._checkout.at = t0
        with self.Session() as s, s.begin():
            c = jobstate.claim_next(s, self.settings, "sample", owner, self.settings.lease_seconds)
        t1 = time.perf_counter()
        if not self._in_window(time.monotonic()):
            return c
        with self.lock:
            if c is None:
                self.stats.empty += 1
            else:
                self.stats.claims += 1
                self.stats.latencies.append(t1 - t0)
                self.stats.pool_waits.append(self._checkout.at - t0)
                self.stats.stmt.append(getattr(self._checkout, "stmt", 0.0))
                if c.waited_s is not None:
                    self.stats.waits.setdefault(c.tenant_id, []).append(c.waited_s)
                    self.stats.prio_waits.setdefault(c.priority, []).append(c.waited_s)
        return c

    def _compute(self, c) -> bool:
        """Sleep one piece, heartbeating; False when stopped (the job is given back)."""
        from shared import jobstate

        start = time.monotonic()
        end = start + self.piece_s
        while True:
            now = time.monotonic()
            if self.stop.is_set():
                self._count_busy(c.tenant_id, start, now)
                with self.Session() as s, s.begin():
                    jobstate.release(s, c.job_id, c.attempt, "bench stopped", settings=self.settings)
                return False
            if now >= end:
                break
            time.sleep(min(self.heartbeat_s, end - now))
            if time.monotonic() < end:
                with self.Session() as s, s.begin():
                    jobstate.heartbeat(s, c.job_id, c.attempt, self.settings.lease_seconds, settings=self.settings)
        self._count_busy(c.tenant_id, start, end)
        return True

    def _count_busy(self, tenant: str, start: float, end: float) -> None:
        lo, hi = self.window
        inside = max(0.0, min(end, hi) - max(start, lo))
        with self.lock:
            self.stats.busy[tenant] = self.stats.busy.get(tenant, 0.0) + inside

    def _work(self, i: int) -> None:
        from shared import jobstate
        from shared.models import JobStatus

        owner = f"bench:{os.getpid()}:{i}"
        while not self.stop.is_set():
            c = self._claim(owner)
            if c is None:
                self.wake.acquire(timeout=0.2)
                continue
            if self._compute(c):
                with self.Session() as s, s.begin():
                    jobstate.finish(s, c.job_id, c.attempt, JobStatus.succeeded, settings=self.settings)


def merge(parts: list[Stats]) -> Stats:
    """One :class:`Stats` of several fleets' (processes') figures over the same window."""
    out = Stats()
    for st in parts:
        out.latencies += st.latencies
        out.stmt += st.stmt
        out.pool_waits += st.pool_waits
        out.empty += st.empty
        out.claims += st.claims
        for k, v in st.busy.items():
            out.busy[k] = out.busy.get(k, 0.0) + v
        for k, w in st.waits.items():
            out.waits.setdefault(k, []).extend(w)
        for k, w in st.prio_waits.items():
            out.prio_waits.setdefault(k, []).extend(w)
    return out


def _fleet_main(url: str, settings_json: str, n: int, piece_s: float, heartbeat_s: float, pool: int,
                start: float, seconds: float, out) -> None:
    """One process of a fleet spread over processes: ``n`` worker threads with a pool of ``pool``
    connections, measured over the window from ``start`` (monotonic) for ``seconds``; sends its
    :class:`Stats` back on ``out``."""
    from sqlalchemy import create_engine

    from shared.settings import Settings

    settings = Settings.model_validate_json(settings_json)
    engine = create_engine(url, pool_size=pool, max_overflow=0, pool_timeout=300)
    fleet = Fleet(engine, settings, n, piece_s, heartbeat_s).start()
    try:
        st = fleet.measure(seconds, start=start)
    finally:
        fleet.close()
        engine.dispose()
    out.put(st)


class ProcessFleet:
    """``n`` simulated workers in ``procs`` processes of ``n / procs`` threads each, as real workers
    are processes: 256 threads in one interpreter spend the GIL, not the database, and issue fewer
    claims than 2-s pieces want (116–129 claims/s of 128 in docs/benchmarks.md). The pool is split
    between the processes. Measured over one window that every process starts at the same instant."""

    def __init__(self, url: str, settings, n: int, procs: int, piece_s: float, heartbeat_s: float, pool: int,
                 warmup_s: float, seconds: float):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.out = ctx.Queue()
        self.seconds, self.piece_s = seconds, piece_s
        self.start_at = time.monotonic() + warmup_s
        sizes = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        self.procs = [ctx.Process(target=_fleet_main, daemon=True,
                                  args=(url, settings.model_dump_json(), k, piece_s, heartbeat_s,
                                        max(2, pool // procs), self.start_at, seconds, self.out))
                      for k in sizes if k > 0]

    def start(self) -> ProcessFleet:
        for p in self.procs:
            p.start()
        return self

    def result(self) -> Stats:
        wait = max(0.0, self.start_at - time.monotonic()) + self.seconds + self.piece_s + 120
        parts = [self.out.get(timeout=wait) for _ in self.procs]
        for p in self.procs:
            p.join(30)
        return merge(parts)


def _probe_main(url: str, settings_json: str, seconds: float, every_s: float, out) -> None:
    """A worker process of its own (as every ``ldmq worker`` is): claims a job every ``every_s``
    and finishes it at once, timing each claim call; and times, after each, a transaction of as
    many round trips doing nothing (a ``SELECT 1`` and the commit: the claim is its statement and
    the commit), the floor this machine puts under any claim at that moment.
    Sends (claim latencies, floor latencies, the claims' commits alone) back on ``out``."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    from shared import jobstate
    from shared.models import JobStatus
    from shared.settings import Settings

    settings = Settings.model_validate_json(settings_json)
    engine = create_engine(url, pool_size=1, max_overflow=0)
    lat: list[float] = []
    floor: list[float] = []
    commits: list[float] = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            with Session(engine) as s:
                with s.begin():
                    c = jobstate.claim_next(s, settings, "sample", f"probe:{os.getpid()}", settings.lease_seconds)
                    t1 = time.perf_counter()
            if c is not None:
                lat.append(time.perf_counter() - t0)
                commits.append(time.perf_counter() - t1)
                with Session(engine) as s, s.begin():
                    jobstate.finish(s, c.job_id, c.attempt, JobStatus.succeeded, settings=settings)
            t0 = time.perf_counter()
            with Session(engine) as s, s.begin():
                s.execute(text("SELECT 1"))
            floor.append(time.perf_counter() - t0)
            time.sleep(every_s)
    finally:
        engine.dispose()
        out.put((lat, floor, commits))


class Probe:
    """Runs :func:`_probe_main` in a spawned process beside the fleet (its own interpreter: no GIL
    shared with the fleet's threads, as between real workers)."""

    def __init__(self, url: str, settings, seconds: float, every_s: float = 0.05):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.out = ctx.Queue()
        self.proc = ctx.Process(target=_probe_main, args=(url, settings.model_dump_json(), seconds, every_s, self.out),
                                daemon=True)

    def start(self) -> Probe:
        self.proc.start()
        return self

    def result(self, timeout: float = 120) -> tuple[list[float], list[float], list[float]]:
        got = self.out.get(timeout=timeout)
        self.proc.join(10)
        return got


def submit(fleet: Fleet, tenant: str, priority: int = 0) -> None:
    """One one-piece job, through the ORM as the API inserts it, then a wake-up."""
    from shared.models import Job, sched_key, utcnow

    now = utcnow()
    with fleet.Session() as s, s.begin():
        s.add(Job(tenant_id=tenant, type="sample", status="queued", params={}, total_items=1, priority=priority,
                  created_at=now, enqueued_at=now, max_attempts=3,
                  sched_key=sched_key(now, priority, fleet.settings.sched_aging_s)))
    fleet.wake.release()


def _submitter(fleet: Fleet, tenants: list[str], every_s: float, seconds: float) -> threading.Thread:
    def run():
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end and not fleet.stop.is_set():
            submit(fleet, tenants[i % len(tenants)])
            i += 1
            time.sleep(every_s)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# -- the parts -------------------------------------------------------------------------------------

def scale_part(engine, settings, args, results: dict) -> None:
    for n in [int(x) for x in args.queued.split(",")]:
        reset(engine)
        tenants = make_tenants(engine, [1, 1, 2, 4])
        took = bulk_queue(engine, tenants, n, aging_s=settings.sched_aging_s, priority_mod=3)
        print(f"queued {n} jobs over {len(tenants)} tenants in {took:.1f} s (INSERT … SELECT generate_series, "
              f"VACUUM ANALYZE)", flush=True)
        url = engine.url.render_as_string(hide_password=False)
        for w in [int(x) for x in args.workers.split(",")]:
            procs = -(-w // args.threads_per_proc)
            if procs > 1:
                # the processes import and connect (~2 s), then every worker claims once: the steady state
                warmup = 4.0 + min(2.0, args.piece_s * 2)
                fleet = ProcessFleet(url, settings, w, procs, args.piece_s, args.heartbeat_s, args.pool, warmup,
                                     args.run_s).start()
                time.sleep(max(0.0, fleet.start_at - time.monotonic()))
                probe = Probe(url, settings, args.run_s).start()
                st = fleet.result()
                solo, floor, commits = probe.result()
            else:
                fleet = Fleet(engine, settings, w, args.piece_s, args.heartbeat_s).start()
                try:
                    time.sleep(min(2.0, args.piece_s * 2))  # every worker claimed once: the steady state
                    probe = Probe(url, settings, args.run_s).start()
                    st = fleet.measure(args.run_s)
                    solo, floor, commits = probe.result()
                finally:
                    fleet.close()
            util = 100.0 * sum(st.busy.values()) / (w * args.run_s)
            p50, p99 = pct(st.latencies, 50) * 1e3, pct(st.latencies, 99) * 1e3
            s50, s99 = pct(solo, 50) * 1e3, pct(solo, 99) * 1e3
            results[("scale", n, w)] = dict(p99=p99, util=util, solo_p99=s99)
            print(f"scale queued={n} workers={w} ({procs} process{'es' if procs > 1 else ''}): {st.claims / args.run_s:.1f} claims/s, claim p50 {p50:.1f} ms "
                  f"p99 {p99:.1f} ms (pool wait p99 {pct(st.pool_waits, 99) * 1e3:.1f} ms; the claim statement's round trip "
                  f"p50 {pct(st.stmt, 50) * 1e3:.1f} ms p99 {pct(st.stmt, 99) * 1e3:.1f} ms), "
                  f"utilisation {util:.1f} %; a worker process of its own beside them: claim p50 {s50:.1f} ms "
                  f"p99 {s99:.1f} ms ({len(solo)} claims; their commits alone p50 {pct(commits, 50) * 1e3:.1f} ms p99 "
                  f"{pct(commits, 99) * 1e3:.1f} ms), the same round trips doing nothing (SELECT 1) p50 "
                  f"{pct(floor, 50) * 1e3:.1f} ms p99 {pct(floor, 99) * 1e3:.1f} ms", flush=True)
        explain_claim(engine, settings, max(int(x) for x in args.workers.split(",")))


def explain_claim(engine, settings, running: int) -> None:
    """EXPLAIN ANALYZE of the claim on the queue as it stands, with ``running`` jobs under live leases
    (made so in a transaction that is rolled back)."""
    from sqlalchemy import text

    from shared.models import utcnow
    from shared.scheduler import claim_params, claim_sql

    now = utcnow()
    with engine.connect() as c:
        tx = c.begin()
        c.execute(text("UPDATE jobs SET status = 'running', lease_expires_at = :exp, charged_s = :now_s, attempts = 1 "
                       "WHERE id IN (SELECT id FROM jobs WHERE status = 'queued' LIMIT :n)"),
                  {"exp": now.replace(year=now.year + 1), "now_s": now.timestamp(), "n": running})
        plan = c.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + claim_sql("postgresql")),
                         claim_params(settings, "sample", "explain", now, 60)).scalars().all()
        tx.rollback()
    print(f"EXPLAIN ANALYZE of the claim ({running} running):")
    for line in plan:
        print("    " + line)


def fairness_part(engine, settings, args, results: dict) -> None:
    weights = [1.0, 2.0, 4.0]
    reset(engine)
    tenants = make_tenants(engine, weights)
    backlog = int(args.fair_workers * (args.fair_s + 5) / args.piece_s * 1.5) + 100
    bulk_queue(engine, tenants, backlog, aging_s=settings.sched_aging_s)
    fleet = Fleet(engine, settings, args.fair_workers, args.piece_s, args.heartbeat_s).start()
    try:
        st = fleet.measure(args.fair_s)
    finally:
        fleet.close()
    total = sum(st.busy.values()) or 1.0
    xs, parts = [], []
    for tid, w in zip(tenants, weights):
        share, target = st.busy.get(tid, 0.0) / total, w / sum(weights)
        xs.append(share / target)
        parts.append(f"weight {w:g} share {share:.3f} (target {target:.3f})")
    index = jain(xs)
    util = 100.0 * total / (args.fair_workers * args.fair_s)
    results["jain"], results["fair_util"] = index, util
    print(f"fairness ({args.fair_workers} workers, {args.fair_s:g} s, every tenant backlogged): {', '.join(parts)}; "
          f"Jain {index:.3f}; utilisation {util:.1f} %", flush=True)


def flood_part(engine, settings, args, results: dict) -> None:
    reset(engine)
    flood, *small = make_tenants(engine, [1.0, 1.0, 1.0])
    fleet = Fleet(engine, settings, args.flood_workers, args.piece_s, args.heartbeat_s).start()
    try:
        _submitter(fleet, small, args.small_every_s, args.flood_s)
        idle = fleet.measure(args.flood_s)
        idle_waits = [w for t in small for w in idle.waits.get(t, [])]
        backlog = int(args.flood_workers * (args.flood_s + 5) / args.piece_s * 1.5) + 100
        bulk_queue(engine, [flood], backlog, aging_s=settings.sched_aging_s)
        time.sleep(args.piece_s)  # the fleet is busy with the flood
        _submitter(fleet, small, args.small_every_s, args.flood_s)

        def burst():
            time.sleep(args.flood_s / 2)
            for _ in range(args.burst):
                submit(fleet, flood, priority=10)
        threading.Thread(target=burst, daemon=True).start()
        busy = fleet.measure(args.flood_s)
    finally:
        fleet.close()
    waits = [w for t in small for w in busy.waits.get(t, [])]
    burst_waits = busy.prio_waits.get(10, [])
    results["small_p95"] = pct(waits, 95)
    print(f"flood ({args.flood_workers} workers, piece {args.piece_s:g} s, a small job every {args.small_every_s:g} s): "
          f"small-job wait p50 {pct(waits, 50):.3f} s p95 {pct(waits, 95):.3f} s under the flood ({len(waits)} jobs), "
          f"p50 {pct(idle_waits, 50):.3f} s p95 {pct(idle_waits, 95):.3f} s on an idle cluster ({len(idle_waits)} jobs); "
          f"the flooding tenant's priority-10 burst: wait p50 {pct(burst_waits, 50):.3f} s "
          f"p95 {pct(burst_waits, 95):.3f} s ({len(burst_waits)} jobs)", flush=True)


def _machine(engine) -> str:
    from sqlalchemy import text

    with engine.connect() as c:
        version = c.execute(text("SHOW server_version")).scalar()
        maxc = c.execute(text("SHOW max_connections")).scalar()
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores ({cpu or platform.machine()}), Python {platform.python_version()}, "
            f"PostgreSQL {version} (max_connections {maxc})")


def _pool_size(admin_url: str, wanted: int) -> int:
    """``wanted``, or fewer: the server's max_connections less those in use, less 10 for others."""
    from sqlalchemy import create_engine, text

    e = create_engine(admin_url)
    with e.connect() as c:
        maxc = int(c.execute(text("SHOW max_connections")).scalar())
        used = int(c.execute(text("SELECT count(*) FROM pg_stat_activity")).scalar())
    e.dispose()
    return max(2, min(wanted, maxc - used - 10))


def _targets(results: dict, args) -> list[str]:
    out = []
    workers = max(int(x) for x in args.workers.split(","))
    queued = max(int(x) for x in args.queued.split(","))
    big = results.get(("scale", queued, workers))
    if big:
        out.append(f"claim p99 < 25 ms at {workers} workers and {queued} queued, as one worker process sees it: "
                   f"{big['solo_p99']:.1f} ms ({'met' if big['solo_p99'] < 25 else 'missed'}; the {workers} simulated "
                   f"workers' own, threads of a few processes: {big['p99']:.1f} ms)")
    utils = [v["util"] for k, v in results.items() if isinstance(k, tuple)] + [results.get("fair_util", 100.0)]
    out.append(f"utilisation ≥ 95 % while work is queued: lowest {min(utils):.1f} % "
               f"({'met' if min(utils) >= 95 else 'missed'})")
    out.append(f"Jain ≥ 0.95: {results['jain']:.3f} ({'met' if results['jain'] >= 0.95 else 'missed'})")
    bound = args.piece_s + 1.0
    out.append(f"small-job p95 wait under a flood ≤ {bound:g} s: {results['small_p95']:.3f} s "
               f"({'met' if results['small_p95'] <= bound else 'missed'})")
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    from sqlalchemy import create_engine

    from shared.settings import Settings

    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)  # the migration's chatter is not a figure
    pool = _pool_size(args.pg, args.pool)
    results: dict = {}
    with BenchDb(args.pg, keep=args.keep_db) as db:
        engine = create_engine(db.url, pool_size=pool, max_overflow=0, pool_timeout=300)
        settings = Settings(database_url=db.url, lease_seconds=max(30, int(args.piece_s * 10)),
                            heartbeat_seconds=args.heartbeat_s)
        print(f"ldmq bench scheduler: {_machine(engine)}; pool of {pool} connections; piece {args.piece_s:g} s, "
              f"heartbeat {args.heartbeat_s:g} s", flush=True)
        try:
            scale_part(engine, settings, args, results)
            fairness_part(engine, settings, args, results)
            flood_part(engine, settings, args, results)
        finally:
            engine.dispose()
    print("targets:")
    for line in _targets(results, args):
        print("  " + line)
    return 0
