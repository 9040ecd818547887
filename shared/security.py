"""API keys: ``ldmq_<prefix>_<secret>``. Stored as SHA-256 (keys are 256-bit random, so a fast
hash is enough), looked up by prefix, compared in constant time, revocable."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "ldmq"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_name: str) -> str:
    """Create (or reuse) the tenant and a new key for it; return the key (shown once)."""
    tenant = session.scalars(select(Tenant).where(Tenant.name == tenant_name)).first()
    if tenant is None:
        tenant = Tenant(name=tenant_name, webhook_secret=secrets.token_hex(32))
        session.add(tenant)
        session.flush()
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=hash_key(key)))
    session.flush()
    return key


@dataclass(frozen=True, slots=True)
class TenantRef:
    """The caller's tenant as a plain value: no ORM state, so the API can cache it and share it
    between threads (services read ``id``; whatever else they need they load in their session).
    The tenant's own request rate rides along (None: the deployment's default), so the API's
    per-request rate check needs no query of its own; it is as fresh as the cached key."""

    id: str
    name: str
    rate_per_s: float | None = None
    rate_burst: int | None = None


def authenticate(session: Session, key: str) -> TenantRef | None:
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    # One round trip: the key and its tenant together.
    found = session.execute(
        select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id).where(ApiKey.prefix == parts[1])
    ).first()
    row, tenant = found if found is not None else (None, None)
    # Compare even when there is no row, so timing does not tell which prefixes exist.
    expected = row.key_hash if row is not None else "0" * 64
    ok = hmac.compare_digest(expected, hash_key(key))
    if not ok or row is None or row.revoked_at is not None:
        return None
    return TenantRef(id=tenant.id, name=tenant.name, rate_per_s=tenant.rate_per_s, rate_burst=tenant.rate_burst)


def revoke_key(session: Session, prefix: str) -> bool:
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    return True
