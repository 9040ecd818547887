"""The sweeper: the database says which jobs should be running; the broker may have lost them.

One pass (``ldmq sweeper`` runs one every ``sweep_interval_s``; several sweepers may run, every
change is a conditional UPDATE and a duplicate message is harmless):

1. fail jobs that used up their attempts (poison jobs: their lease expired on the last one);
2. finish abandoned cancels;
3. ask the broker which messages it holds (Redis: the queue lists and the ``unacked`` hash; the
   file-system transport: its message files) and top up the wake-ups. A message only wakes a
   worker of its queue, which then claims the best ready job of that type (``shared.scheduler``),
   not necessarily the one the message names; so what must hold is a count, per queue: at least
   as many waiting messages as jobs a worker could claim now. Those jobs are running jobs whose
   lease expired (their worker died) and queued jobs not sent within ``orphan_grace_s`` (a
   FLUSHALL, a lost message, a worker that died between receiving the message and claiming),
   those of a tenant at its ``max_running`` left out beyond its free slots (a wake-up could not
   take them, and would be re-sent every pass). Messages that name a job sent within the grace are
   left to that job. The shortfall is sent, naming jobs no message names.
   Where the broker cannot be inspected, queued jobs are re-sent every ``requeue_after_s``.
4. retention (``retention_days`` > 0): delete up to ``retention_batch`` final jobs that finished
   longer ago, as ``DELETE /v1/jobs/{id}`` does, then retry stored objects whose deletion failed
   earlier (``shared.deletion``). Models and datasets are never removed by retention.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from shared import jobstate
from shared.db import session_scope
from shared.deletion import apply_retention, purge_pending
from shared.models import utcnow
from shared.queue import QUEUE_FOR_TYPE, TASK_FOR_TYPE, enqueue
from shared.settings import Settings
from shared.storage import get_storage

log = logging.getLogger(__name__)

PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: queue name + sep + priority step
PRIORITY_STEPS = (3, 6, 9)
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


@dataclass
class BrokerView:
    """Job ids with a message waiting in a queue, and job ids delivered but not acked (with the
    delivery time, seconds since the epoch). ``messages``: (job type, job id) of every waiting
    message, duplicates included (each one wakes a worker)."""

    waiting: set[str] = field(default_factory=set)
    unacked: dict[str, float] = field(default_factory=dict)
    messages: list[tuple[str, str]] = field(default_factory=list)

    def add_waiting(self, payload: dict) -> None:
        job_id = _job_id_of(payload)
        if job_id:
            self.waiting.add(job_id)
            self.messages.append((_TYPE_OF_TASK[(payload.get("headers") or {})["task"]], job_id))


_TYPE_OF_TASK = {task: type_ for type_, task in TASK_FOR_TYPE.items()}


def _job_id_of(payload: dict) -> str | None:
    """The job id a Celery (protocol 2) message carries: its first positional argument."""
    headers = payload.get("headers") or {}
    if headers.get("task") not in TASK_FOR_TYPE.values():
        return None
    try:
        body = payload["body"]
        if (payload.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0])
    except Exception:
        rep = headers.get("argsrepr") or ""
        return rep.strip("[]()',\" ") or None


def _redis_view(url: str) -> BrokerView:
    import redis

    r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
    try:
        view = BrokerView()
        pipe = r.pipeline()
        for queue in sorted(set(QUEUE_FOR_TYPE.values())):
            for key in [queue, *(f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS)]:
                pipe.lrange(key, 0, -1)
        pipe.hgetall(UNACKED_KEY)
        pipe.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)
        *lists, unacked, index = pipe.execute()
        for items in lists:
            for raw in items:
                try:
                    view.add_waiting(json.loads(raw))
                except ValueError:
                    continue
        delivered = {tag.decode() if isinstance(tag, bytes) else tag: ts for tag, ts in index}
        for tag, raw in unacked.items():
            tag = tag.decode() if isinstance(tag, bytes) else tag
            try:
                payload = json.loads(raw)[0]
            except (ValueError, IndexError, TypeError):
                continue
            job_id = _job_id_of(payload)
            if job_id:
                view.unacked[job_id] = max(view.unacked.get(job_id, 0.0), delivered.get(tag, 0.0))
        return view
    finally:
        r.close()


def _filesystem_view(folder: Path) -> BrokerView:
    view = BrokerView()
    for path in folder.glob("*.msg"):
        try:
            view.add_waiting(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return view


def broker_view(settings: Settings) -> BrokerView | None:
    """What the broker holds, or None where it cannot be inspected."""
    url = settings.effective_broker_url
    if url.startswith(("redis://", "rediss://", "unix://")):
        return _redis_view(url)
    if url.startswith("filesystem://"):
        return _filesystem_view(settings.broker_folder / "queue")
    return None


def housekeeping(settings: Settings) -> dict[str, list[str]]:
    """Retention and the retry of pending object deletions; a failure is logged, and the rest of
    the pass (requeues) is not held up by it."""
    expired: list[str] = []
    try:
        storage = get_storage(settings)
        expired = apply_retention(settings, storage)
        purge_pending(settings, storage, limit=settings.retention_batch)
    except Exception as exc:
        log.warning("sweeper: retention or object deletion failed (%s: %s); retrying next pass",
                    type(exc).__name__, exc)
    if expired:
        log.info("sweeper: deleted %d jobs past retention: %s", len(expired), expired)
    return {"expired": expired}


def sweep_once(settings: Settings) -> dict[str, list[str]]:
    result = _requeue_pass(settings)
    result.update(housekeeping(settings))
    return result


def _requeue_pass(settings: Settings) -> dict[str, list[str]]:
    with session_scope(settings) as s:
        failed = jobstate.fail_exhausted(s)
        canceled = jobstate.cancel_abandoned(s)
        candidates = jobstate.sweep_candidates(s)
        free = jobstate.free_slots(s)
    try:
        view = broker_view(settings)
    except Exception as exc:  # broker down: nothing to compare with, and nothing could be sent anyway
        log.warning("sweeper: cannot inspect the broker: %s", exc)
        return {"failed": failed, "canceled": canceled, "requeued": []}
    candidates = _within_free_slots(candidates, free)
    due = _due_on_timer(settings, candidates) if view is None else _shortfall(settings, candidates, view)
    requeued = []
    for job_id, job_type in due:
        try:
            enqueue(job_id, job_type, settings)
        except Exception as exc:
            log.warning("sweeper: cannot enqueue %s: %s", job_id, exc)
            continue
        requeued.append(job_id)
    if requeued:
        with session_scope(settings) as s:
            jobstate.mark_enqueued(s, requeued)
    if failed or canceled or requeued:
        log.info("sweeper: failed=%s canceled=%s requeued=%s", failed, canceled, requeued)
    return {"failed": failed, "canceled": canceled, "requeued": requeued}


def _within_free_slots(candidates: list, free: dict[str, int]) -> list:
    """Drop the jobs of a tenant at its ``max_running`` beyond the runs it may still start (the
    candidates come in claim order, so the first ones stay)."""
    left = dict(free)
    kept = []
    for c in candidates:
        if c.tenant_id in left:
            if left[c.tenant_id] <= 0:
                continue
            left[c.tenant_id] -= 1
        kept.append(c)
    return kept


def _due_on_timer(settings: Settings, candidates: list) -> list[tuple[str, str]]:
    """The broker cannot be seen: re-send running jobs whose lease expired, and queued jobs on a timer."""
    now = utcnow()
    due = []
    for c in candidates:
        stale = c.enqueued_at is None or now - c.enqueued_at > timedelta(seconds=settings.requeue_after_s)
        if c.status == "running" or stale:
            due.append((c.job_id, c.type))
    return due


def _shortfall(settings: Settings, candidates: list, view: BrokerView) -> list[tuple[str, str]]:
    """Per job type: the claimable jobs beyond the waiting messages that can wake a worker for them."""
    now = utcnow()
    grace = timedelta(seconds=settings.orphan_grace_s)
    recent = {c.job_id for c in candidates if c.enqueued_at is not None and now - c.enqueued_at < grace}
    due: list[tuple[str, str]] = []
    for job_type in sorted({c.type for c in candidates}):
        need = []
        for c in candidates:
            if c.type != job_type or c.job_id in recent:
                continue  # a message was just sent for it (it may still be on its way)
            delivered = view.unacked.get(c.job_id)
            if c.status == "queued" and delivered is not None and time.time() - delivered < settings.orphan_grace_s:
                continue  # a worker just received it and is claiming
            need.append(c)
        spare = sum(1 for t, job_id in view.messages if t == job_type and job_id not in recent)
        short = len(need) - spare
        if short > 0:
            unnamed = [c for c in need if c.job_id not in view.waiting] or need
            due.extend((c.job_id, c.type) for c in unnamed[:short])
    return due


def run_forever(settings: Settings, interval_s: float) -> None:
    import signal

    stop = {"now": False}

    def on_term(_sig, _frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_term)
    log.info("sweeper: running every %g s", interval_s)
    while not stop["now"]:
        try:
            sweep_once(settings)
        except Exception as exc:
            log.warning("sweeper pass failed (%s: %s); retrying", type(exc).__name__, exc)
        deadline = time.monotonic() + interval_s
        while not stop["now"] and time.monotonic() < deadline:
            time.sleep(min(0.2, interval_s))
    log.info("sweeper: stopped")
