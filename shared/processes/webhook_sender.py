"""The webhook sender (``ldmq webhooks``, :func:`run_forever`): POST a job's events, read from the
``job_events`` outbox, to the URL set at submit.

Workers never talk to receivers: they only append events in their own transactions. This process
does two steps per pass, each safe to run in several processes at once:

1. **scan**: for every job whose webhook can still fire (``job_webhooks.done`` is false), read its
   events after the job's cursor (``scanned_through``) and add a ``webhook_deliveries`` row for
   each event the webhook subscribed to. Rows are unique per (event, url), so a re-scan adds
   nothing twice. Once a job's final event (succeeded, failed, canceled) is behind the cursor,
   the job is ``done`` and never scanned again.
2. **send**: take the due deliveries (``pending`` and ``next_attempt_at`` passed) with one
   conditional UPDATE that counts the attempt and moves ``next_attempt_at`` ahead by a lease (so a
   sender that dies mid-request only delays the delivery); POST each one, signed, with no
   transaction open; record the answer: a 2xx is ``delivered``; anything else (another status, a
   timeout, a refused connection, a redirect) is retried with exponential back-off and jitter
   until ``max_attempts``, then the delivery is ``failed``.

Why a per-job cursor is enough: every transaction that appends an event first locks the job's row
(an UPDATE, or SELECT ... FOR UPDATE; see ``shared.jobstate``), so one job's events commit in id
order. As a guard against a future writer that does not, the cursor only moves past events older
than ``settle_s``; the unique constraint makes the re-scan of those last seconds harmless.

Delivery is at least once and not ordered across retries: receivers dedupe and order by
``event_id``. What each POST carries (body, headers, signature) is in :mod:`shared.webhooks`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session

from shared.db import insert_for, session_scope
from shared.logctx import job_context
from shared.netguard import PIN_EXTENSION, PinnedTransport, RefusedDestination, resolve_pinned
from shared.models import FINAL_STATUSES, Job, JobEvent, JobWebhook, Tenant, WebhookDelivery, utcnow
from shared.settings import Settings
from shared.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    USER_AGENT,
    event_body,
    signature_header,
    signing_secrets,
)

log = logging.getLogger(__name__)

_FINAL_TYPES = frozenset(s.value for s in FINAL_STATUSES)


class WebhookSettings(BaseSettings):
    """Settings of the delivery loop (env prefix ``LDMQ_WEBHOOK_``)."""

    model_config = SettingsConfigDict(env_prefix="LDMQ_WEBHOOK_", env_file=".env", extra="ignore")

    interval_s: float = Field(default=1.0, gt=0, description="Pause between passes that found nothing to do.")
    timeout_s: float = Field(default=10.0, gt=0, description="Per-request timeout (connect and read).")
    max_attempts: int = Field(default=8, ge=1, le=100)
    backoff_s: float = Field(default=5.0, gt=0, description="Delay before the 2nd attempt; doubles after each.")
    backoff_max_s: float = Field(default=3600.0, gt=0)
    jitter: float = Field(default=0.1, ge=0, lt=1, description="Random share added to or taken from each delay.")
    lease_s: float = Field(default=60.0, gt=0, description="How long a taken delivery is hidden from other senders.")
    settle_s: float = Field(default=10.0, ge=0, description="Age after which an event is behind the scan cursor.")
    batch: int = Field(default=100, ge=1, le=10_000)
    concurrency: int = Field(default=8, ge=1, le=256)
    block_private: bool = Field(
        default=True,
        description="Refuse URLs that resolve to loopback, private, link-local, shared (100.64/10) or reserved "
                    "addresses (shared.netguard). Turn it off (LDMQ_WEBHOOK_BLOCK_PRIVATE=false) only where "
                    "every tenant is trusted with your internal network.",
    )

    @model_validator(mode="after")
    def _lease_covers_a_request(self) -> "WebhookSettings":
        if self.lease_s <= self.timeout_s:
            raise ValueError(f"lease_s ({self.lease_s}) must be longer than timeout_s ({self.timeout_s})")
        return self


def backoff_delay(attempt: int, ws: WebhookSettings, rand: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    base = min(ws.backoff_max_s, ws.backoff_s * 2 ** (attempt - 1))
    r = (rand or random).uniform(-ws.jitter, ws.jitter) if ws.jitter else 0.0
    return max(0.0, base * (1 + r))


# ---- step 1: scan the outbox ---------------------------------------------------------------------

def scan(session: Session, ws: WebhookSettings, now: datetime | None = None) -> int:
    """Add deliveries for new events of jobs with live webhooks; returns how many were added."""
    now = now or utcnow()
    settled_before = now - timedelta(seconds=ws.settle_s)
    insert_fn = insert_for(session)
    added = 0
    after = 0
    # Per job: (url, subscribed events, cursor now, last settled id in order, still settling?, final seen)
    state: dict[str, dict[str, Any]] = {}
    while True:
        rows = session.execute(
            select(JobEvent.id, JobEvent.job_id, JobEvent.type, JobEvent.created_at, JobWebhook.url,
                   JobWebhook.events, JobWebhook.scanned_through)
            .join(JobWebhook, JobWebhook.job_id == JobEvent.job_id)
            .where(JobWebhook.done.is_(False), JobEvent.id > JobWebhook.scanned_through, JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(ws.batch)
        ).all()
        for ev_id, job_id, type_, created_at, url, events, cursor in rows:
            st = state.setdefault(job_id, {"cursor": cursor, "settling": False, "done": False})
            if type_ in (events or []):
                inserted = session.execute(
                    insert_fn(WebhookDelivery)
                    .values(event_id=ev_id, job_id=job_id, url=url, status="pending", attempts=0,
                            next_attempt_at=now, created_at=now)
                    .on_conflict_do_nothing(index_elements=["event_id", "url"])
                    .returning(WebhookDelivery.id)
                ).first()
                added += inserted is not None
            # The cursor moves over a prefix of settled events only.
            if not st["settling"] and created_at <= settled_before:
                st["cursor"] = ev_id
                st["done"] = st["done"] or type_ in _FINAL_TYPES
            else:
                st["settling"] = True
        if len(rows) < ws.batch:
            break
        after = rows[-1][0]
    for job_id, st in state.items():
        session.execute(
            update(JobWebhook)
            .where(JobWebhook.job_id == job_id, JobWebhook.scanned_through < st["cursor"])
            .values(scanned_through=st["cursor"], done=st["done"])
            .execution_options(synchronize_session=False)
        )
    return added


# ---- step 2: send ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outgoing:
    delivery_id: int
    attempt: int
    url: str
    body: bytes
    event_id: int
    event_type: str
    job_id: str
    tenant_id: str
    secrets: tuple[str, ...]  # the current signing secret, then the previous one during a rotation


@dataclass(frozen=True)
class Outcome:
    delivery_id: int
    attempt: int
    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def take_due(session: Session, ws: WebhookSettings, now: datetime | None = None) -> list[Outgoing]:
    """Claim due deliveries (count the attempt, hide them for ``lease_s``) and build their requests."""
    now = now or utcnow()
    due = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.id)
        .limit(ws.batch)
        .with_for_update(skip_locked=True)
    )
    claimed = dict(session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(due.scalar_subquery()), WebhookDelivery.status == "pending")
        .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=now + timedelta(seconds=ws.lease_s),
                last_attempt_at=now)
        .returning(WebhookDelivery.id, WebhookDelivery.attempts)
        .execution_options(synchronize_session=False)
    ).all())
    if not claimed:
        return []
    rows = session.execute(
        select(WebhookDelivery, JobEvent, Job, Tenant)
        .join(JobEvent, JobEvent.id == WebhookDelivery.event_id)
        .join(Job, Job.id == WebhookDelivery.job_id)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .where(WebhookDelivery.id.in_(list(claimed)))
        .order_by(WebhookDelivery.id)
    ).all()
    out = []
    for d, ev, job, tenant in rows:
        out.append(Outgoing(delivery_id=d.id, attempt=claimed[d.id], url=d.url, body=event_body(ev, job),
                            event_id=ev.id, event_type=ev.type, job_id=job.id, tenant_id=tenant.id,
                            secrets=tuple(signing_secrets(session, tenant))))
    return out


def sender_client(ws: WebhookSettings):
    """The sender's HTTP client: each request goes to the address checked for it (``PinnedTransport``),
    never follows a redirect, and times out after ``timeout_s``."""
    import httpx

    return httpx.Client(transport=PinnedTransport(), timeout=ws.timeout_s, follow_redirects=False)


def send(http, out: Outgoing, ws: WebhookSettings) -> Outcome:
    """POST one delivery; never raises (a failure is an outcome)."""
    try:  # resolved once here; the request connects to this address (no second lookup to rebind)
        address = resolve_pinned(out.url, block_private=ws.block_private)
    except RefusedDestination as exc:
        return Outcome(out.delivery_id, out.attempt, None, str(exc)[:300])
    ts = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        TIMESTAMP_HEADER: ts,
        SIGNATURE_HEADER: signature_header(list(out.secrets), ts, out.body),
        "X-Ldmq-Event": out.event_type,
        "X-Ldmq-Event-Id": str(out.event_id),
        "X-Ldmq-Delivery": str(out.delivery_id),
        "X-Ldmq-Delivery-Attempt": str(out.attempt),
    }
    try:
        r = http.post(out.url, content=out.body, headers=headers, extensions={PIN_EXTENSION: address})
    except Exception as exc:  # timeouts, refused connections, bad URLs: all retried
        # The record keeps the kind of failure only: an exception's text can carry what the
        # receiver's network said, which a tenant must not read back.
        return Outcome(out.delivery_id, out.attempt, None, f"{type(exc).__name__} (no response)")
    if 200 <= r.status_code < 300:
        return Outcome(out.delivery_id, out.attempt, r.status_code, None)
    # Never the receiver's body: an internal service's answer must not leak through the records.
    return Outcome(out.delivery_id, out.attempt, r.status_code, f"HTTP {r.status_code} {r.reason_phrase}"[:100])


def record(session: Session, outcomes: list[Outcome], ws: WebhookSettings, now: datetime | None = None,
           rand: random.Random | None = None) -> dict[str, int]:
    """Write what each attempt got; only the sender that holds an attempt may write it."""
    now = now or utcnow()
    counts = {"delivered": 0, "retrying": 0, "failed": 0}
    for o in outcomes:
        fence = and_(WebhookDelivery.id == o.delivery_id, WebhookDelivery.attempts == o.attempt,
                     WebhookDelivery.status == "pending")
        values: dict[str, Any] = {"last_status_code": o.status_code, "last_error": o.error}
        if o.ok:
            values.update(status="delivered", delivered_at=now)
            kind = "delivered"
        elif o.attempt >= ws.max_attempts:
            values.update(status="failed")
            kind = "failed"
        else:
            values.update(next_attempt_at=now + timedelta(seconds=backoff_delay(o.attempt, ws, rand)))
            kind = "retrying"
        res = session.execute(update(WebhookDelivery).where(fence).values(**values)
                              .execution_options(synchronize_session=False))
        if res.rowcount:
            counts[kind] += 1
    return counts


def deliver_once(settings: Settings, ws: WebhookSettings, http=None) -> dict[str, int]:
    """One pass: scan, then send what is due. Returns counts (for logs and tests)."""
    with session_scope(settings) as s:
        added = scan(s, ws)
    with session_scope(settings) as s:
        outgoing = take_due(s, ws)
    counts = {"added": added, "sent": len(outgoing), "delivered": 0, "retrying": 0, "failed": 0}
    if not outgoing:
        return counts
    own = http is None
    http = http or sender_client(ws)
    try:
        def one(o: Outgoing) -> Outcome:
            with job_context(o.job_id, o.tenant_id):
                outcome = send(http, o, ws)
                if not outcome.ok:
                    log.warning("webhook delivery %s (event %s %s) attempt %s to %s failed: %s", o.delivery_id,
                                o.event_id, o.event_type, o.attempt, o.url, outcome.error)
                return outcome

        if len(outgoing) == 1 or ws.concurrency == 1:
            outcomes = [one(o) for o in outgoing]
        else:
            with ThreadPoolExecutor(max_workers=min(ws.concurrency, len(outgoing))) as pool:
                outcomes = list(pool.map(one, outgoing))
    finally:
        if own:
            http.close()
    with session_scope(settings) as s:
        counts.update(record(s, outcomes, ws))
    return counts


def run_forever(settings: Settings, ws: WebhookSettings, stop: threading.Event | None = None) -> None:
    """The delivery loop of ``ldmq webhooks``: passes back to back while there is work, else a
    pause of ``interval_s``; a failed pass (database down) is logged and retried."""
    stop = stop or threading.Event()
    log.info("webhooks: delivering (timeout %ss, up to %s attempts, %s at once)", ws.timeout_s, ws.max_attempts,
             ws.concurrency)
    with sender_client(ws) as http:
        while not stop.is_set():
            busy = False
            try:
                counts = deliver_once(settings, ws, http)
                busy = counts["added"] > 0 or counts["sent"] >= ws.batch
                if counts["sent"]:
                    log.info("webhooks: %s", counts)
            except Exception:
                log.exception("webhooks: pass failed; retrying")
            if not busy:
                stop.wait(ws.interval_s)
