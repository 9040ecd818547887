"""``ldmq bench api``: submit latency under load and dispatch latency (figures, not a test).

1. A load generator on loopback sends ``POST /v1/jobs/sample`` at a fixed rate (open loop: each
   request is scheduled by the clock, not by the previous answer) to a real ``ldmq api`` process
   backed by Postgres and Redis, and prints p50/p90/p99/max latency and the error count.
2. With an idle ``ldmq worker`` on the sample queue, it submits jobs one at a time and prints the
   time from submit to ``running`` as the database recorded it (``started_at - created_at``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ldmq.bench import _free_port, stop_all, wait_healthy


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def _load(url: str, key: str, body: dict, rate: float, seconds: float) -> tuple[list[float], int]:
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=10) as client:
        async def one():
            nonlocal errors
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/jobs/sample", json=body)
                ok = r.status_code == 202
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            if not ok:
                errors += 1

        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ldmq bench api", description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--dispatch-jobs", type=int, default=20)
    ap.add_argument("--pg-admin", default=os.environ.get("LDMQ_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--redis", default=os.environ.get("LDMQ_BENCH_REDIS", "redis://127.0.0.1:6379/13"))
    args = ap.parse_args(argv)

    import httpx
    import redis
    from sqlalchemy import create_engine, text

    from worker.tiny_pipeline import build_tiny_pipeline

    workdir = Path(tempfile.mkdtemp(prefix="ldmq-bench-api-"))
    db = f"ldmq_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.pg_admin, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db}"'))
    redis.Redis.from_url(args.redis).flushdb()
    env = {**os.environ, "LDMQ_DATABASE_URL": args.pg_admin.rsplit("/", 1)[0] + f"/{db}",
           "LDMQ_BROKER_URL": args.redis, "LDMQ_STORAGE_URL": (workdir / "objects").as_uri(),
           "LDMQ_VAR_DIR": str(workdir / "var")}
    procs: list[subprocess.Popen] = []
    try:
        def cli(*a) -> str:
            r = subprocess.run([sys.executable, "-m", "ldmq.cli", *a], env=env, capture_output=True, text=True, check=True)
            return r.stdout.strip().splitlines()[-1]

        cli("migrate")
        key = cli("keys", "create", "--tenant", "bench")
        model = cli("models", "import", str(build_tiny_pipeline(workdir / "tiny")), "--tenant", "bench")
        port = _free_port()
        log = open(workdir / "procs.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "ldmq.cli", "api", "--port", str(port), "--log-level",
                                       "warning", "--no-access-log"], env=env, stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        body = {"model": model, "prompts": [{"prompt": "a cat", "seed": 1}], "steps": 2}
        asyncio.run(_load(url, key, body, 20, 2))  # warm-up
        lat, errors = asyncio.run(_load(url, key, body, args.rate, args.seconds))
        ms = [x * 1000 for x in lat]
        print(f"submit latency at {args.rate:.0f} req/s for {args.seconds:.0f} s ({len(ms)} requests, {errors} errors):")
        print(f"  p50 {_pct(ms, 50):.1f} ms   p90 {_pct(ms, 90):.1f} ms   p99 {_pct(ms, 99):.1f} ms   max {max(ms):.1f} ms"
              f"   (bar: p99 < 50 ms)")

        # Dispatch: drop the load's backlog, then an idle worker takes jobs one at a time.
        redis.Redis.from_url(args.redis).flushdb()
        procs.append(subprocess.Popen([sys.executable, "-m", "ldmq.cli", "worker", "--queues", "sample",
                                       "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT))
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        dispatch = []
        for i in range(args.dispatch_jobs + 1):
            job = client.post("/v1/jobs/sample", json={**body, "prompts": [{"prompt": f"d{i}", "seed": i}]}).json()
            deadline = time.monotonic() + 120
            while job["status"] not in ("succeeded", "failed", "canceled"):
                if time.monotonic() > deadline:
                    raise RuntimeError("a dispatch job did not finish")
                time.sleep(0.05)
                job = client.get(f"/v1/jobs/{job['id']}").json()
            if i == 0:
                continue  # the first job also pays the worker's start and model load
            from datetime import datetime

            started = datetime.fromisoformat(job["started_at"])
            created = datetime.fromisoformat(job["created_at"])
            dispatch.append((started - created).total_seconds() * 1000)
        print(f"dispatch (submit -> running, idle worker, {len(dispatch)} jobs): p50 {statistics.median(dispatch):.1f} ms"
              f"   max {max(dispatch):.1f} ms   (bar: p50 < 100 ms)")
        return 0
    finally:
        stop_all(procs)
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
