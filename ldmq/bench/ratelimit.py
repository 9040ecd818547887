"""``ldmq bench ratelimit``: what a tenant's rate check costs, and that two API processes share
one rate (figures, not a test).

1. The check alone: sequential ``take`` calls on one event loop, against Redis (the Lua script,
   one round trip) and against the per-process fallback; wall time per call (p50, p99) and the
   calling process's CPU time per call, which is what an API process pays per request.
2. Two processes, one key: each calls ``take`` as fast as it can for a few seconds; the accepted
   rate with the buckets in Redis, and with per-process buckets (what ``--workers 2`` had before).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
import uuid

from ldmq.bench.stack import add_arguments


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def _cost(buckets, n: int) -> tuple[list[float], float]:
    key = f"bench-{uuid.uuid4().hex}"
    walls = []
    cpu0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        await buckets.take(key, 1e9, 10**9)  # never refused: every call is a full check and spend
        walls.append(time.perf_counter() - t0)
    return walls, time.process_time() - cpu0


def _hammer(redis_url: str | None, key: str, rate: float, burst: int, seconds: float, barrier, results) -> None:
    """One 'API process': warm up (imports, the connection, the script), wait for the other at
    ``barrier``, then take from ``key`` as fast as it can for ``seconds``; put how many passed."""
    from api.ratelimit import LocalBuckets, RedisBuckets

    buckets = RedisBuckets(redis_url) if redis_url else LocalBuckets()

    async def go() -> int:
        await buckets.take(f"warm-{uuid.uuid4().hex}", rate, burst)
        barrier.wait()  # blocks the loop, which has nothing else to do yet
        passed, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            passed += await buckets.take(key, rate, burst) == 0
        return passed

    results.put(asyncio.run(go()))


def _two_processes(redis_url: str | None, rate: float, burst: int, seconds: float) -> list[int]:
    ctx = multiprocessing.get_context("spawn")
    barrier, results, key = ctx.Barrier(2), ctx.Queue(), f"bench-{uuid.uuid4().hex}"
    procs = [ctx.Process(target=_hammer, args=(redis_url, key, rate, burst, seconds, barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    passed = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    return passed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ldmq bench ratelimit", description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=50.0, help="the shared key's rate, requests/s")
    ap.add_argument("--seconds", type=float, default=4.0)
    add_arguments(ap, redis_db=12)
    args = ap.parse_args(argv)
    from api.ratelimit import LocalBuckets, RedisBuckets

    for name, buckets in (("redis (Lua, 1 round trip)", RedisBuckets(args.redis)), ("per-process", LocalBuckets())):
        asyncio.run(_cost(buckets, 200))  # warm-up: the connection, the script's SHA
        walls, cpu = asyncio.run(_cost(buckets, args.calls))
        us = [w * 1e6 for w in walls]
        print(f"check, {name:26}: p50 {_pct(us, 50):7.1f} us   p99 {_pct(us, 99):7.1f} us   "
              f"CPU {cpu / args.calls * 1e6:6.1f} us/call   ({args.calls} calls)")
    burst = max(1, int(args.rate))
    for name, url in (("shared (redis)", args.redis), ("per-process", None)):
        passed = _two_processes(url, args.rate, burst, args.seconds)
        allowed = burst + args.rate * args.seconds
        print(f"2 processes, 1 key, {name:15}: accepted {sum(passed):5d} ({passed[0]} + {passed[1]}) in "
              f"{args.seconds:.0f} s; one bucket allows {allowed:.0f} ({args.rate:g}/s, burst {burst})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
