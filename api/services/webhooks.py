"""Webhooks, the tenant's side: the secret that signs every delivery."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.schemas import WebhookSecretOut
from shared.models import Tenant
from shared.security import TenantRef
from shared.settings import Settings
from shared.webhooks import ensure_webhook_secret, rotate_webhook_secret, signing_secrets


def _out(session: Session, row: Tenant) -> WebhookSecretOut:
    previous = len(signing_secrets(session, row)) > 1
    return WebhookSecretOut(secret=ensure_webhook_secret(session, row),
                            previous_valid_until=row.webhook_secret_previous_until if previous else None)


def webhook_secret(session: Session, tenant: TenantRef) -> WebhookSecretOut:
    return _out(session, session.get_one(Tenant, tenant.id))


def rotate_secret(session: Session, settings: Settings, tenant: TenantRef) -> WebhookSecretOut:
    """A new secret; deliveries carry a second signature with the old one for the grace period."""
    row = session.get_one(Tenant, tenant.id)
    rotate_webhook_secret(session, row, settings.webhook_secret_grace_s)
    return _out(session, row)
