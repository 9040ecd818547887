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
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ldmq.bench.stack import Stack, add_arguments, wait_for_job


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends a prepared request and reads one response
    (``Content-Length`` framed, as uvicorn answers JSON). The load generator must cost far less
    than the server it measures: httpx's async client spent a whole core at 100 requests/s here,
    and its own queueing then showed up as server latency."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(self.buffer[:end]).split(b"\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[:end + 4 + length]
        self.waiter.set_result(int(head[0].split()[1]))

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(exc or "connection closed"))

    async def send(self, request: bytes) -> int:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


async def _load(url: str, key: str, body: dict, rate: float, seconds: float,
                timeout: float = 10.0) -> tuple[list[tuple[float, float]], int]:
    """Open loop: request i is due at ``i / rate`` seconds whatever happened to the others, and its
    latency counts from when it was due (so a stalled generator or server cannot hide its own
    queueing). Returns (seconds into the run, latency) pairs and the number of non-202 answers."""
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    request = (f"POST /v1/jobs/sample HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload
    loop = asyncio.get_running_loop()
    idle: list[_Connection] = []
    latencies: list[tuple[float, float]] = []
    errors = 0

    async def one(due: float) -> None:
        nonlocal errors
        conn = idle.pop() if idle else None
        try:
            if conn is None or conn.transport is None:
                _, conn = await loop.create_connection(_Connection, parts.hostname, parts.port)
            status = await asyncio.wait_for(conn.send(request), timeout)
            idle.append(conn)
        except (OSError, ConnectionError, asyncio.TimeoutError):
            status = 0
            if conn is not None and conn.transport is not None:
                conn.transport.close()
        latencies.append((due - start, time.perf_counter() - due))
        if status != 202:
            errors += 1

    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()
    return latencies, errors


def _run(coro):
    """Run the load on uvloop (when installed) with the collector paused: this process imported
    torch and diffusers to build the tiny model, and a full collection of that heap paused the
    generator ~300 ms, which the open-loop clock then charged to the server as latency."""
    import gc

    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(coro)
        return uvloop.run(coro)
    finally:
        gc.enable()
        gc.unfreeze()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ldmq bench api", description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--dispatch-jobs", type=int, default=20)
    ap.add_argument("--api-workers", type=int, default=1, help="API processes (ldmq api --workers)")
    add_arguments(ap, redis_db=13)
    args = ap.parse_args(argv)

    from datetime import datetime

    from worker.model.tiny_pipeline import build_tiny_pipeline

    workdir = Path(tempfile.mkdtemp(prefix="ldmq-bench-api-"))
    with Stack(workdir, pg_admin=args.pg_admin, redis_url=args.redis,
               storage_url=(workdir / "objects").as_uri()) as stack:
        stack.flush_broker()
        key, model = stack.tenant_with_model("bench", build_tiny_pipeline(workdir / "tiny"))
        stack.start_api("--workers", str(args.api_workers))
        url = stack.url
        body = {"model": model, "prompts": [{"prompt": "a cat", "seed": 1}], "steps": 2}
        _run(_load(url, key, body, 20, 2))  # warm-up
        lat, errors = _run(_load(url, key, body, args.rate, args.seconds))
        ms = [x * 1000 for _, x in lat]
        print(f"submit latency at {args.rate:.0f} req/s for {args.seconds:.0f} s, {args.api_workers} API process(es) "
              f"({len(ms)} requests, {errors} errors):")
        print(f"  p50 {_pct(ms, 50):.1f} ms   p90 {_pct(ms, 90):.1f} ms   p99 {_pct(ms, 99):.1f} ms   max {max(ms):.1f} ms"
              f"   (bar: p99 < 50 ms)")
        window = 10.0
        by_window: dict[int, list[float]] = {}
        for at, x in lat:
            by_window.setdefault(int(at // window), []).append(x * 1000)
        print(f"  p99 by {window:.0f}-second window: "
              + "  ".join(f"{_pct(v, 99):.0f}" for _, v in sorted(by_window.items())) + " ms")

        # Dispatch: drop the load's backlog, then an idle worker takes jobs one at a time.
        stack.flush_broker()
        stack.start_worker("sample")
        dispatch = []
        with stack.client(key, timeout_s=30) as client:
            for i in range(args.dispatch_jobs + 1):
                job = client.post("/v1/jobs/sample", json={**body, "prompts": [{"prompt": f"d{i}", "seed": i}]}).json()
                job = wait_for_job(client, job, interval_s=0.05, timeout_s=120)
                if i == 0:
                    continue  # the first job also pays the worker's start and model load
                started = datetime.fromisoformat(job["started_at"])
                created = datetime.fromisoformat(job["created_at"])
                dispatch.append((started - created).total_seconds() * 1000)
        print(f"dispatch (submit -> running, idle worker, {len(dispatch)} jobs): p50 {statistics.median(dispatch):.1f} ms"
              f"   max {max(dispatch):.1f} ms   (bar: p50 < 100 ms)")
        return 0


if __name__ == "__main__":
    sys.exit(main())
