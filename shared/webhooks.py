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
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from shared.models import EVENT_TYPES, Job, JobEvent, Tenant

SIGNATURE_HEADER = "X-Ldmq-Signature"
TIMESTAMP_HEADER = "X-Ldmq-Timestamp"
USER_AGENT = "ldmq-webhooks/1"

# Events a webhook can subscribe to: every event type but ``requeued``, which is internal (the
# job goes on by itself).
WEBHOOK_EVENTS: tuple[str, ...] = tuple(e for e in EVENT_TYPES if e != "requeued")
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
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def ensure_webhook_secret(session: Session, tenant: Tenant) -> str:
    """The tenant's signing secret, created on first use (tenants made before secrets existed)."""
    if not tenant.webhook_secret:
        tenant.webhook_secret = secrets.token_hex(32)
        session.flush()
    return tenant.webhook_secret


def event_body(event: JobEvent, job: Job) -> bytes:
    """The JSON body a delivery of ``event`` POSTs (compact, keys sorted: what is signed)."""
    payload = {"event_id": event.id, "type": event.type, "job_id": job.id, "job_type": job.type,
               "created_at": event.created_at.isoformat(), "data": event.data or {}}
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
