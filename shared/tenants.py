"""A tenant's scheduling settings, set by the operator (``ldmq tenants set``): its ``weight`` (its
share of the fleet under weighted fair share), ``max_running`` (jobs it may run at once, enforced
when a worker claims), ``max_queued_images`` (images it may have waiting or in progress, enforced
at submit: see ``api.services.quotas``) and its request rate (``rate_per_s`` with ``rate_burst``,
enforced per request by the API's token buckets). ``None`` means unlimited; the request rate falls
back to the deployment's ``LDMQ_RATE_PER_S`` / ``LDMQ_RATE_BURST`` (see :func:`effective_rate`).

The command line parses and prints; the rules (what a value may be, what clears a limit) live here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import Tenant
from shared.registry import tenant_by_name
from shared.settings import Settings

#: The settings ``ldmq tenants set`` changes, in the order they are printed.
FIELDS: tuple[str, ...] = ("weight", "max_running", "max_queued_images", "rate_per_s", "rate_burst")
#: Words that clear a limit (back to unlimited, or to the deployment's default rate).
CLEAR_WORDS = frozenset({"none", "unlimited", "default"})
WEIGHT_MAX = 1e6  # a weight is a ratio: a million to one is already "everything"
COUNT_MAX = 2**31 - 1  # the columns are 32-bit integers


class InvalidTenantSettings(ValueError):
    """One or more values are not acceptable; ``problems`` lists every one (not just the first)."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TenantSettings:
    """What the operator set for a tenant (``None``: unlimited / the deployment's default)."""

    id: str
    name: str
    weight: float
    max_running: int | None
    max_queued_images: int | None
    rate_per_s: float | None
    rate_burst: int | None

    @classmethod
    def of(cls, t: Tenant) -> TenantSettings:
        return cls(id=t.id, name=t.name, weight=float(t.weight if t.weight is not None else 1.0),
                   max_running=t.max_running, max_queued_images=t.max_queued_images, rate_per_s=t.rate_per_s,
                   rate_burst=t.rate_burst)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_value(field: str, text: str) -> float | int | None:
    """A command-line value for ``field``: ``none``/``unlimited``/``default`` clears it, as does
    ``0`` for ``rate_per_s`` (a rate of zero would refuse every request; suspend a tenant by
    revoking its keys, or with ``--max-queued-images 0``). Other checks: :func:`validate`."""
    if field not in FIELDS:
        raise InvalidTenantSettings([f"unknown setting {field!r}; valid: {', '.join(FIELDS)}"])
    raw = text.strip().lower()
    if raw in CLEAR_WORDS:
        return None
    try:
        value: float | int = float(raw) if field in ("weight", "rate_per_s") else int(raw)
    except ValueError:
        kind = "a number" if field in ("weight", "rate_per_s") else "a whole number"
        raise InvalidTenantSettings([f"{field}: {text!r} is not {kind} (or 'none' to clear it)"]) from None
    if field == "rate_per_s" and value == 0:
        return None
    return value


def parse_values(texts: dict[str, str]) -> dict[str, float | int | None]:
    """:func:`parse_value` of each field, then :func:`validate`: every problem together."""
    values, problems = {}, []
    for field, text in texts.items():
        try:
            values[field] = parse_value(field, text)
        except InvalidTenantSettings as exc:
            problems += exc.problems
    try:
        validate(values)
    except InvalidTenantSettings as exc:
        problems += exc.problems
    if problems:
        raise InvalidTenantSettings(problems)
    return values


def validate(changes: dict[str, Any]) -> None:
    """Every problem with ``changes`` (field → value), raised together as InvalidTenantSettings."""
    problems = [f"unknown setting {k!r}; valid: {', '.join(FIELDS)}" for k in changes if k not in FIELDS]
    for field, value in changes.items():
        if field not in FIELDS or value is None:  # None clears (weight: back to 1)
            continue
        if field in ("weight", "rate_per_s"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not 0 < value <= WEIGHT_MAX:
                problems.append(f"{field} must be a number > 0 and at most {WEIGHT_MAX:g}; got {value!r}")
        else:
            low = 1 if field == "rate_burst" else 0
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= COUNT_MAX:
                problems.append(f"{field} must be a whole number from {low} to {COUNT_MAX}; got {value!r}")
    if problems:
        raise InvalidTenantSettings(problems)


def get_tenant_settings(session: Session, name: str) -> TenantSettings:
    """The named tenant's settings; TenantNotFound (which names only the tenant asked for)."""
    return TenantSettings.of(tenant_by_name(session, name))


def list_tenant_settings(session: Session) -> list[TenantSettings]:
    return [TenantSettings.of(t) for t in session.scalars(select(Tenant).order_by(Tenant.name))]


def set_tenant_settings(session: Session, name: str, changes: dict[str, Any]) -> TenantSettings:
    """Apply ``changes`` (field → value; None clears, except ``weight``, which goes back to 1) to the
    named tenant, all or nothing. The API sees a new rate within ``LDMQ_AUTH_CACHE_S`` (it travels
    with the cached key); quotas apply to the next submit."""
    validate(changes)
    tenant = tenant_by_name(session, name)
    for field, value in changes.items():
        setattr(tenant, field, 1.0 if field == "weight" and value is None else value)
    session.flush()
    return TenantSettings.of(tenant)


def effective_rate(rate_per_s: float | None, rate_burst: int | None, settings: Settings) -> tuple[float, int] | None:
    """(requests per second, burst) that apply to a tenant, or None for unlimited: its own values,
    else the deployment's (``LDMQ_RATE_PER_S``, ``LDMQ_RATE_BURST``); a burst left unset is one
    second's worth of the rate, at least 1."""
    rate = rate_per_s if rate_per_s is not None else settings.rate_per_s
    if rate is None:
        return None
    burst = rate_burst if rate_burst is not None else settings.rate_burst
    return rate, burst if burst is not None else max(1, math.ceil(rate))


def lock_queued_images_quota(session: Session, tenant_id: str) -> int | None:
    """The tenant's ``max_queued_images``, its row locked until the transaction ends when it has
    one (None, and no lock, when it has none).

    Two submits that each counted the queue before either inserted would both pass the quota; the
    lock makes the second count after the first commits. ``FOR NO KEY UPDATE`` conflicts with
    itself (and with ``ldmq tenants set``) but not with the key-share lock every job insert takes
    on its tenant through the foreign key, so a tenant without a quota never waits here: the
    ``IS NOT NULL`` makes the row (and its lock) part of the answer only when a quota applies.
    On PostgreSQL a waiter re-reads the row once the lock is free, so a quota cleared meanwhile
    is seen. SQLite ignores the lock (it runs one writer at a time anyway)."""
    return session.scalars(
        select(Tenant.max_queued_images)
        .where(Tenant.id == tenant_id, Tenant.max_queued_images.is_not(None))
        .with_for_update(key_share=True)  # SQLAlchemy's spelling of FOR NO KEY UPDATE
    ).first()
