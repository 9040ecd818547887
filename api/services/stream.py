"""``GET /v1/jobs/{id}/stream``: one job's events as server-sent events (the format: docs/api.md).

How it is built, and why:

- **The table is the stream.** Every SSE event with an ``id:`` is a row of the ``job_events``
  outbox (``id:`` = its id, ``event:`` = its type, ``data:`` = the row as ``GET
  /v1/jobs/{id}/events`` lists it). A job's events commit in id order (each writer locks the job
  row first), so "every event with a larger id" misses none and repeats none: a client that
  reconnects with ``Last-Event-ID`` (header, or ``?last_event_id=``) resumes exactly after the last
  event it saw, on this API process or another one, before or after a restart.
- **Progress is an event the worker writes**, at most one a second per job plus a job's or a
  training stage's last step (``shared.jobstate.ProgressEvents``), rather than the stream reading
  the job row and inventing id-less progress events: a resumed stream then replays exactly what a
  live one showed, webhooks and the dashboard read the same events, and the outbox grows by at most
  3,600 progress rows an hour of a job's run, whatever the model's speed.
- **Waiting is a poll** of Postgres every ``LDMQ_STREAM_POLL_S`` (1 s: the rate progress events
  are written at): one indexed query (``ix_job_events_job_id_id``) on a pooled connection that
  goes back to the pool at once, so an idle stream holds no connection, only a coroutine.
  ``ldmq bench stream`` (docs/benchmarks.md; 2-core VM under load 15+): a poll 6 ms median, 100
  idle streams 18 % of one core of the API process with at most 6 connections busy at once, an
  event at the client 0.5 s after its commit (p50; p90 0.9 s). LISTEN/NOTIFY would cut that
  latency but needs a connection held per API process and a second path for SQLite (the
  embedded demo); one poll per process for all its streams would cut the CPU: neither is needed
  at a progress bar's one update a second.
- **Bounded**: a stream lives at most ``LDMQ_STREAM_MAX_S`` (then the client reconnects and
  misses nothing), a tenant holds at most ``LDMQ_STREAM_MAX_PER_TENANT`` per API process (429
  beyond), a quiet stream gets a comment line every ``LDMQ_STREAM_HEARTBEAT_S`` (15 s) so proxies
  keep it, and one poll reads at most ``POLL_LIMIT`` rows.
- **It ends** after the job's final event (``succeeded``/``failed``/``canceled``) with an
  ``end`` event that has no id; a stream that closes without ``end`` is to be resumed.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import and_, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import StreamingResponse

from api.errors import ApiError
from api.schemas import EventOut
from shared.db import session_scope
from shared.models import FINAL_STATUSES, Job, JobEvent
from shared.settings import Settings

log = logging.getLogger(__name__)

POLL_LIMIT = 200  # rows one poll reads (~300 bytes each): a long backlog comes in bounded pieces
RETRY_MS = 1000  # the `retry:` an EventSource waits before it reconnects
LAST_EVENT_ID_MAX = 2**63 - 1
_FINAL = frozenset(s.value for s in FINAL_STATUSES)


def last_event_id(header: str | None, query: str | None) -> int:
    """Where to resume: the ``Last-Event-ID`` header (what a browser's EventSource sends when it
    reconnects, so it wins) or ``?last_event_id=``; 0 (the job's first event) without either."""
    for name, raw in (("Last-Event-ID", header), ("last_event_id", query)):
        if raw is None or not raw.strip():
            continue
        value = raw.strip()
        if not value.isdigit() or int(value) > LAST_EVENT_ID_MAX:
            raise ApiError(422, "invalid_request", f"{name} must be the id of an event (a non-negative integer), "
                           f"not {value[:40]!r}", [{"field": name, "message": "not a non-negative integer"}])
        return int(value)
    return 0


class StreamSlots:
    """Open streams per tenant in this API process: ``acquire`` refuses beyond ``limit`` (429)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()  # acquired on a route thread, released on the event loop

    def acquire(self, tenant_id: str) -> None:
        with self._lock:
            n = self._open.get(tenant_id, 0)
            if n >= self.limit:
                raise ApiError(429, "too_many_streams", f"this tenant already has {n} open job streams on this "
                               "API process (LDMQ_STREAM_MAX_PER_TENANT); close one, or poll "
                               "GET /v1/jobs/{id}/events", headers={"Retry-After": "5"})
            self._open[tenant_id] = n + 1

    def release(self, tenant_id: str) -> None:
        with self._lock:
            n = self._open.get(tenant_id, 0) - 1
            if n > 0:
                self._open[tenant_id] = n
            else:
                self._open.pop(tenant_id, None)

    def count(self, tenant_id: str) -> int:
        with self._lock:
            return self._open.get(tenant_id, 0)


def close_streams_on_exit_signals(stop: threading.Event) -> None:
    """Set ``stop`` when this process is asked to exit (SIGTERM, SIGINT), then let the server's
    own handler run. Why: uvicorn's graceful shutdown waits for every open response to finish, and
    a stream only ends with its job, so one open stream held ``ldmq api`` past a SIGTERM for
    ``LDMQ_STREAM_MAX_S`` (30 min; a rollout's pod is killed long before). Streams see ``stop``
    at their next poll and close without ``end``: their clients resume on another process.
    Called from the app's lifespan, after uvicorn installed its handlers (which it restores when it
    exits); only on the main thread, where signal handlers live (not in a test's in-process app)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            stop.set()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:  # nobody handled it: what it would have done
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        signal.signal(sig, handler)


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that runs ``on_close`` however it ends (finished, client
    gone, cancelled before its first byte): the tenant's stream slot is always given back."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse(data: Any, *, event: str | None = None, id: int | None = None) -> bytes:
    """One SSE message; ``data`` as one line of JSON (json.dumps writes no newline)."""
    head = (f"id: {id}\n" if id is not None else "") + (f"event: {event}\n" if event else "")
    return f"{head}data: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode()


@dataclass(frozen=True)
class Poll:
    status: str | None  # the job's status; None: the job is gone (deleted)
    events: list[EventOut]


def poll(settings: Settings, tenant_id: str, job_id: str, after_id: int, limit: int = POLL_LIMIT) -> Poll:
    """The job's status and its next events after ``after_id``, in one statement (one snapshot: a
    final status is never seen without its final event, which commits with it)."""
    q = (select(Job.status, JobEvent)
         .select_from(Job)
         .outerjoin(JobEvent, and_(JobEvent.job_id == Job.id, JobEvent.id > after_id))
         .where(Job.id == job_id, Job.tenant_id == tenant_id)
         .order_by(JobEvent.id)
         .limit(limit))
    with session_scope(settings) as s:
        rows = s.execute(q).all()
        if not rows:
            return Poll(None, [])
        events = [EventOut(id=e.id, type=e.type, data=e.data or {}, created_at=e.created_at)
                  for _, e in rows if e is not None]
        return Poll(rows[0][0], events)


async def job_stream(settings: Settings, tenant_id: str, job_id: str, after_id: int,
                     snapshot: dict[str, Any], stop: threading.Event) -> AsyncIterator[bytes]:
    """The body of one stream: ``retry``, the job as it is now (``event: job``, no id), then its
    events after ``after_id`` as they are written, then ``end`` once the job has ended. Closed
    without ``end`` (to be resumed) at the time limit, on a database error, or once ``stop`` is
    set (the process is exiting)."""
    yield f"retry: {RETRY_MS}\n\n".encode() + sse(snapshot, event="job")
    started = last_sent = time.monotonic()
    while True:
        if stop.is_set():
            yield b": the API process is stopping; reconnect with Last-Event-ID\n\n"
            return
        try:
            found = await anyio.to_thread.run_sync(poll, settings, tenant_id, job_id, after_id)
        except SQLAlchemyError as exc:  # the database is away: the client resumes from its last id
            log.warning("job stream %s: database error, closing the stream: %s", job_id, type(exc).__name__)
            yield b": database unavailable; reconnect with Last-Event-ID\n\n"
            return
        if found.status is None:
            yield sse({"reason": "deleted"}, event="end")
            return
        if found.events:
            after_id = found.events[-1].id
            yield b"".join(sse(e.model_dump(mode="json"), event=e.type, id=e.id) for e in found.events)
            last_sent = time.monotonic()
            if len(found.events) == POLL_LIMIT:
                continue  # more are waiting: no pause
        if found.status in _FINAL:
            yield sse({"reason": "final", "status": found.status}, event="end")
            return
        now = time.monotonic()
        if now - started >= settings.stream_max_s:
            yield b": stream time limit reached; reconnect with Last-Event-ID\n\n"
            return
        if now - last_sent >= settings.stream_heartbeat_s:
            yield b": keep-alive\n\n"
            last_sent = now
        await anyio.sleep(settings.stream_poll_s)
