"""Webhooks, the facts both sides share: which events a webhook may subscribe to, which URLs it may
use, and the wire format of a delivery (body, headers, signature). The API checks and documents
them; the sender (:mod:`shared.processes.webhook_sender`, ``ldmq webhooks``) builds every POST from
them.

Each POST carries::

    X-Ldmq-Timestamp: <unix seconds>
    X-Ldmq-Signature: sha256=<hex HMAC-SHA256(tenant webhook secret, "<timestamp>.<body>")>
    X-Ldmq-Event: <type>      X-Ldmq-Event-Id: <id>      X-Ldmq-Delivery-Attempt: <n>

and a JSON body ``{"event_id", "type", "job_id", "job_type", "created_at", "data"}``.
:func:`verify_signature` is the receiver's side.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from shared.models import EVENT_TYPES, Job, JobEvent, Tenant, utcnow

SIGNATURE_HEADER = "X-Ldmq-Signature"
TIMESTAMP_HEADER = "X-Ldmq-Timestamp"
USER_AGENT = "ldmq-webhooks/1"

# Events a webhook can subscribe to: every event type but ``requeued`` and ``preempted``, which are
# internal (the job goes on by itself).
WEBHOOK_EVENTS: tuple[str, ...] = tuple(e for e in EVENT_TYPES if e not in ("requeued", "preempted"))
DEFAULT_WEBHOOK_EVENTS: tuple[str, ...] = ("started", "succeeded", "failed", "canceled")


# ---- URLs ----------------------------------------------------------------------------------------

def check_url(url: str) -> str:
    """``url`` stripped, if it is an absolute http(s) URL with a host; ValueError otherwise."""
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be an absolute http:// or https:// URL")
    return url


# ---- signing and the body ------------------------------------------------------------------------

def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The ``X-Ldmq-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={mac}"


def verify_signature(secret: str, body: bytes, timestamp: str | None, signature: str | None, *,
                     tolerance_s: float = 300, now: float | None = None) -> bool:
    """A receiver's check: the signature matches and the timestamp is within ``tolerance_s``
    (which stops a captured request from being replayed later)."""
    if not timestamp or not signature or not timestamp.isdigit():
        return False
    if abs((now if now is not None else time.time()) - int(timestamp)) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body)
    # During a rotation the header carries one signature per valid secret: any may match.
    return any(hmac.compare_digest(expected, part.strip()) for part in signature.split(","))


def ensure_webhook_secret(session: Session, tenant: Tenant) -> str:
    """The tenant's signing secret, created on first use (tenants made before secrets existed)."""
    if not tenant.webhook_secret:
        tenant.webhook_secret = secrets.token_hex(32)
        session.flush()
    return tenant.webhook_secret


def rotate_webhook_secret(session: Session, tenant: Tenant, grace_s: float, now: datetime | None = None) -> str:
    """A new signing secret; the current one keeps signing too (a second signature in the header)
    for ``grace_s`` seconds, so receivers can switch without losing a delivery."""
    now = now or utcnow()
    old = ensure_webhook_secret(session, tenant)
    tenant.webhook_secret_previous = old
    tenant.webhook_secret_previous_until = now + timedelta(seconds=grace_s)
    tenant.webhook_secret = secrets.token_hex(32)
    session.flush()
    return tenant.webhook_secret


def signing_secrets(session: Session, tenant: Tenant, now: datetime | None = None) -> list[str]:
    """The secrets a delivery is signed with now: the current one, then the previous one while its
    grace period lasts."""
    out = [ensure_webhook_secret(session, tenant)]
    until = tenant.webhook_secret_previous_until
    if tenant.webhook_secret_previous and until is not None and _aware(until) > (now or utcnow()):
        out.append(tenant.webhook_secret_previous)
    return out


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def signature_header(secrets_: list[str], timestamp: int | str, body: bytes) -> str:
    """The ``X-Ldmq-Signature`` value: one ``sha256=<hex>`` per secret, comma-separated."""
    return ", ".join(sign(s, timestamp, body) for s in secrets_)


def event_body(event: JobEvent, job: Job) -> bytes:
    """The JSON body a delivery of ``event`` POSTs (compact, keys sorted: what is signed)."""
    payload = {"event_id": event.id, "type": event.type, "job_id": job.id, "job_type": job.type,
               "created_at": event.created_at.isoformat(), "data": event.data or {}}
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
