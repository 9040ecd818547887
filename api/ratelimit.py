"""Token buckets that every API process shares: a tenant's request rate (``rate_per_s`` with a
``burst``) and the failed-authentication throttle per client address.

A bucket per process would let ``ldmq api --workers N`` (or N replicas) accept N times the rate.
The buckets live in Redis instead, one key each, updated by one Lua script (:data:`GCRA_LUA`)
in one round trip, atomic because Redis runs a script alone. The script keeps a token bucket in
the form of the generic cell rate algorithm (GCRA, as redis-cell and most gateways do): one
number, the time at which the bucket would be full again (the "theoretical arrival time"); a
request is let through when that time, pushed on by one request's worth (``1 / rate``), is at
most ``burst / rate`` ahead of now. It is the token bucket's arithmetic kept as a time, so a
bucket needs no refill loop, the key can expire once the bucket is full (it then means "full"),
and a rate or burst changed by the operator applies to the state as it is. The clock is Redis's
own (``TIME``), so API processes on hosts whose clocks differ share one. Written by hand: the
Redis client has no rate limiter, and the libraries that add one cost a dependency for a script of
a dozen lines.

**When Redis is unreachable**, the buckets fall back to per-process ones (:class:`LocalBuckets`,
the same arithmetic) and try Redis again after :data:`RETRY_REDIS_S`. That is failing open to
the per-process limit, not to no limit: N API processes then accept at most N times a tenant's
rate (2× in the compose file's ``--workers 2``), and a client still cannot guess keys faster than
N times the failure burst. Failing closed would turn a Redis outage into an outage of the whole
API (every request a 429 or 503) although the API's work (reading jobs, outputs, models from
PostgreSQL and S3) does not need Redis; a 500 is never an answer. Each call waits at most
:data:`REDIS_TIMEOUT_S` for Redis, and only the first call after Redis went away pays that wait.

A call costs one round trip to Redis on the event loop (redis' asyncio client: no thread hop);
see docs/benchmarks.md for what it adds to a submit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Protocol

log = logging.getLogger(__name__)

KEY_PREFIX = "ldmq:rl:"
REDIS_TIMEOUT_S = 0.25  # a loopback round trip is ~0.1 ms: this is a Redis in trouble, not a slow one
RETRY_REDIS_S = 5.0

# KEYS[1]: the bucket. ARGV: rate (requests/s), burst, cost (0: only ask whether one request would
# pass). Returns the seconds to wait (as a string: Lua numbers become integers in replies), "0"
# when the request passes (and its cost was spent).
GCRA_LUA = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = 1 / rate
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local new_tat = tat + math.max(cost, 1) * interval
local wait = new_tat - now - burst * interval
if wait > 0 then return string.format('%.6f', wait) end
if cost > 0 then
  redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
end
return '0'
"""


class Buckets(Protocol):
    async def take(self, key: str, rate: float, burst: int, cost: int = 1) -> float:
        """Spend ``cost`` from bucket ``key`` (``rate`` per second, ``burst`` deep) if it holds it:
        0.0; else the seconds until it will, spending nothing. ``cost=0`` only asks."""


class LocalBuckets:
    """The same buckets in this process's memory: for the embedded default (no Redis) and for
    while Redis is away. At most ``max_keys`` buckets (least recently used dropped: a dropped
    bucket is a full one, so memory stays bounded whatever the clients send)."""

    def __init__(self, max_keys: int = 50_000, clock=time.monotonic):
        self.max_keys, self._clock = max_keys, clock
        self._tat: OrderedDict[str, float] = OrderedDict()

    def take_now(self, key: str, rate: float, burst: int, cost: int = 1) -> float:
        now = self._clock()
        interval = 1.0 / rate
        new_tat = max(self._tat.get(key, now), now) + max(cost, 1) * interval
        wait = new_tat - now - burst * interval
        if wait > 1e-9:
            return wait
        if cost > 0:
            self._tat[key] = new_tat
            self._tat.move_to_end(key)
            while len(self._tat) > self.max_keys:
                self._tat.popitem(last=False)
        return 0.0

    async def take(self, key: str, rate: float, burst: int, cost: int = 1) -> float:
        return self.take_now(key, rate, burst, cost)

    def __len__(self) -> int:
        return len(self._tat)


class RedisBuckets:
    """Buckets in Redis shared by every API process, falling back to ``fallback`` while Redis is
    unreachable (see the module docstring). One asyncio client per event loop (a client's
    connections belong to the loop that opened them; a server has one loop, tests make many)."""

    def __init__(self, url: str, fallback: LocalBuckets | None = None, clock=time.monotonic):
        self.url, self.fallback, self._clock = url, fallback or LocalBuckets(), clock
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, object, object]] = {}
        self._down_until = 0.0

    def _script(self):
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        found = self._clients.get(id(loop))
        if found is None or found[0] is not loop:
            self._clients = {k: v for k, v in self._clients.items() if not v[0].is_closed()}
            client = aioredis.Redis.from_url(self.url, socket_timeout=REDIS_TIMEOUT_S,
                                             socket_connect_timeout=REDIS_TIMEOUT_S, health_check_interval=30)
            found = self._clients[id(loop)] = (loop, client, client.register_script(GCRA_LUA))
        return found[2]

    async def take(self, key: str, rate: float, burst: int, cost: int = 1) -> float:
        from redis.exceptions import RedisError

        if self._clock() < self._down_until:
            return self.fallback.take_now(key, rate, burst, cost)
        try:
            wait = await self._script()(keys=[KEY_PREFIX + key], args=[repr(float(rate)), int(burst), int(cost)])
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log.warning("rate limits: Redis at %s unreachable (%s: %s); per-process buckets for %.0f s",
                        self.url.rpartition("@")[2], type(exc).__name__, exc, RETRY_REDIS_S)
            self._down_until = self._clock() + RETRY_REDIS_S
            return self.fallback.take_now(key, rate, burst, cost)
        return float(wait)


def make_buckets(redis_url: str | None) -> Buckets:
    """Redis-backed buckets when there is a Redis (``Settings.effective_ratelimit_redis_url``),
    else per-process ones (the embedded default runs one API process)."""
    return RedisBuckets(redis_url) if redis_url else LocalBuckets()


def retry_after_header(wait_s: float) -> str:
    """``Retry-After`` is whole seconds: the wait rounded up, at least 1 (0 would invite a retry
    that is refused again)."""
    import math

    return str(max(1, math.ceil(wait_s - 1e-6)))
