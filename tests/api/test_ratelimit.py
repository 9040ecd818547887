"""api.ratelimit: the GCRA token bucket in Redis (one Lua script) and in memory agree; a bucket
is shared by whoever uses the same Redis key; with Redis away the buckets fall back to per-process
ones quickly instead of failing the request."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis

from api.ratelimit import KEY_PREFIX, LocalBuckets, RedisBuckets, retry_after_header
from tests.conftest import free_port


def test_local_bucket_burst_then_rate():
    now = [100.0]
    b = LocalBuckets(clock=lambda: now[0])
    assert [b.take_now("k", 2.0, 3) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert b.take_now("k", 2.0, 3) == pytest.approx(0.5)  # then one per 1/rate
    assert b.take_now("k", 2.0, 3, cost=0) == pytest.approx(0.5)  # asking spends nothing
    now[0] += 0.5
    assert b.take_now("k", 2.0, 3) == 0.0 and b.take_now("k", 2.0, 3) == pytest.approx(0.5)
    assert b.take_now("other", 2.0, 3) == 0.0  # a bucket per key
    now[0] += 60
    assert [b.take_now("k", 2.0, 3) for _ in range(4)][-1] > 0  # full again: the burst, not more


def test_local_buckets_are_bounded():
    b = LocalBuckets(max_keys=10)
    for i in range(100):
        b.take_now(f"k{i}", 1.0, 1)
    assert len(b) == 10


def test_redis_bucket_matches_and_is_shared(redis_url):
    key = f"test-{uuid.uuid4().hex}"
    one, two = RedisBuckets(redis_url), RedisBuckets(redis_url)  # two API processes' worth

    async def go():
        taken = [await (one if i % 2 else two).take(key, 1.0, 4) for i in range(4)]
        wait = await one.take(key, 1.0, 4)
        asked = await two.take(key, 1.0, 4, cost=0)
        return taken, wait, asked

    taken, wait, asked = asyncio.run(go())
    assert taken == [0.0] * 4  # the burst of 4, spent by both together
    assert 0.9 < wait <= 1.0 and 0.9 < asked <= 1.0
    r = redis.Redis.from_url(redis_url)
    assert 0 < r.pttl(KEY_PREFIX + key) <= 5000  # the key goes once the bucket is full again (+1 s)


def test_redis_away_falls_back_to_per_process_buckets_without_waiting_each_time():
    b = RedisBuckets(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there

    async def go():
        start = time.monotonic()
        first = [await b.take("k", 1.0, 2) for _ in range(3)]
        return first, time.monotonic() - start

    (first, took) = asyncio.run(go())
    assert first[:2] == [0.0, 0.0] and first[2] > 0  # the same limit, kept in this process
    assert took < 2.0  # one failed connect (bounded by REDIS_TIMEOUT_S), then no retry for a while


def test_retry_after_is_whole_seconds_rounded_up():
    assert [retry_after_header(w) for w in (0.001, 0.5, 1.0, 1.2, 4.99)] == ["1", "1", "1", "2", "5"]
