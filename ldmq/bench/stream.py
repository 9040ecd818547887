"""``ldmq bench stream``: what ``GET /v1/jobs/{id}/stream`` costs (figures, not a test).

1. One poll (``api.services.stream.poll``) in this process, against a job with ``--events`` events:
   median and p99 time of the idle case (nothing new: what an open stream does every
   ``LDMQ_STREAM_POLL_S``) and of a full page (a client resuming from the start).
2. A real ``ldmq api`` with ``--streams`` streams open on running jobs that write nothing: the API
   process's CPU time per second of wall time, and the most database connections it held (sampled
   from ``pg_stat_activity``): an idle stream holds a coroutine, not a connection.
3. Delivery latency on one of those streams: the time from the commit of a progress event to its
   arrival at the client, over ``--latency-events`` events written at random moments.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from ldmq.bench.stack import Stack, add_arguments


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/<pid>/stat``; Linux)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _jobs(settings, tenant_id: str, n: int) -> list[tuple[str, int]]:
    """``n`` train jobs, claimed as a worker would (running, nothing written): (id, attempt)."""
    from shared import jobstate
    from shared.db import session_scope
    from shared.models import Job

    out = []
    with session_scope(settings) as s:
        for _ in range(n):
            job = Job(tenant_id=tenant_id, type="train", params={})
            s.add(job)
            s.flush()
            out.append((job.id, jobstate.claim(s, job.id, "bench", 3600).attempt))
    return out


def _progress(settings, job_id: str, attempt: int, i: int) -> float:
    """Write one progress event; the time.monotonic() of its commit."""
    from shared import jobstate
    from shared.db import session_scope

    with session_scope(settings) as s:
        jobstate.set_progress(s, job_id, attempt, min(1.0, i / 1000), {"step": i, "total_steps": 1000})
    return time.monotonic()


def bench_poll(settings, tenant_id: str, events: int, repeats: int) -> None:
    from api.services.stream import POLL_LIMIT, poll

    (job_id, attempt), = _jobs(settings, tenant_id, 1)
    for i in range(events):
        _progress(settings, job_id, attempt, i)
    last = poll(settings, tenant_id, job_id, 0, limit=events + 1).events[-1].id
    for label, after in (("idle (nothing new)", last), (f"a page of {POLL_LIMIT} events", 0)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            poll(settings, tenant_id, job_id, after)
            times.append((time.perf_counter() - t0) * 1000)
        print(f"  poll, {label}: median {statistics.median(times):.2f} ms, p99 {_pct(times, 99):.2f} ms "
              f"({repeats} polls, job with {events} events)")


def _reader(url: str, key: str, job_id: str, arrivals: dict, ready: threading.Event, stop: threading.Event) -> None:
    """Hold one stream open; note the arrival time of each event id."""
    import httpx

    from ldmq.client import parse_sse

    try:
        with httpx.Client(timeout=httpx.Timeout(60, connect=10)) as http, \
                http.stream("GET", f"{url}/v1/jobs/{job_id}/stream", headers={"Authorization": f"Bearer {key}"}) as r:
            for kind, fields in parse_sse(r.iter_lines()):
                if kind == "message" and fields.get("event") == "job":
                    ready.set()
                if "id" in fields:
                    arrivals[int(fields["id"])] = time.monotonic()
                if stop.is_set():
                    return
    except httpx.HTTPError:
        return  # the API was stopped at the end of the bench


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ldmq bench stream", description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=500)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    ap.add_argument("--latency-events", type=int, default=40)
    add_arguments(ap, redis_db=12)
    args = ap.parse_args(argv)

    from sqlalchemy import create_engine, text

    from shared.db import session_scope
    from shared.models import JobEvent
    from shared.registry import tenant_by_name
    from shared.settings import Settings

    workdir = Path(tempfile.mkdtemp(prefix="ldmq-bench-stream-"))
    env = {"LDMQ_STREAM_MAX_PER_TENANT": str(args.streams + 1)}
    with Stack(workdir, pg_admin=args.pg_admin, redis_url=args.redis, storage_url=(workdir / "objects").as_uri(),
               env=env) as stack:
        settings = Settings(database_url=stack.env["LDMQ_DATABASE_URL"], broker_url=args.redis,
                            storage_url=stack.env["LDMQ_STORAGE_URL"], var_dir=workdir / "var")
        key = stack.cli("keys", "create", "--tenant", "bench")
        with session_scope(settings) as s:
            tenant_id = tenant_by_name(s, "bench").id
        print("1. one poll, in process:")
        bench_poll(settings, tenant_id, args.events, args.repeats)

        api = stack.start_api()
        jobs = _jobs(settings, tenant_id, args.streams)
        arrivals: dict[int, float] = {}
        stop = threading.Event()
        readies = []
        for job_id, _ in jobs:
            ready = threading.Event()
            readies.append(ready)
            threading.Thread(target=_reader, args=(stack.url, key, job_id, arrivals, ready, stop), daemon=True).start()
        for ready in readies:
            if not ready.wait(60):
                raise RuntimeError("a stream did not open within 60 s")
        db = stack.env["LDMQ_DATABASE_URL"].rsplit("/", 1)[1]
        watch = create_engine(args.pg_admin, isolation_level="AUTOCOMMIT")
        count = text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND state <> 'idle'")
        t0, cpu0, busy = time.monotonic(), _cpu_s(api.pid), []
        with watch.connect() as c:
            while time.monotonic() - t0 < args.idle_seconds:
                busy.append(c.execute(count, {"db": db}).scalar())
                time.sleep(0.05)
        cpu = (_cpu_s(api.pid) - cpu0) / (time.monotonic() - t0)
        watch.dispose()
        print(f"2. {args.streams} idle streams on one API process (poll every {settings.stream_poll_s:g} s): "
              f"{cpu * 100:.1f} % of a core; connections in a query at once: max {max(busy)}, "
              f"mean {statistics.mean(busy):.2f} ({len(busy)} samples over {args.idle_seconds:g} s)")

        job_id, attempt = jobs[0]
        lat = []
        for i in range(args.latency_events):
            time.sleep(random.uniform(0.1, 1.3))  # a random phase against the stream's poll
            committed = _progress(settings, job_id, attempt, i)
            with session_scope(settings) as s:
                eid = s.query(JobEvent.id).filter_by(job_id=job_id).order_by(JobEvent.id.desc()).limit(1).scalar()
            deadline = time.monotonic() + 10
            while eid not in arrivals and time.monotonic() < deadline:
                time.sleep(0.005)
            lat.append((arrivals.get(eid, float("nan")) - committed) * 1000)
        stop.set()
        print(f"3. commit-to-client latency, {len(lat)} events: p50 {_pct(lat, 50):.0f} ms, p90 {_pct(lat, 90):.0f} ms, "
              f"max {max(lat):.0f} ms")
    return 0
