"""Webhooks, the tenant's side: the secret that signs every delivery."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.schemas import WebhookSecretOut
from shared.models import Tenant
from shared.security import TenantRef
from shared.webhooks import ensure_webhook_secret


def webhook_secret(session: Session, tenant: TenantRef) -> WebhookSecretOut:
    return WebhookSecretOut(secret=ensure_webhook_secret(session, session.get_one(Tenant, tenant.id)))
