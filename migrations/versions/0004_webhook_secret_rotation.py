"""webhook secret rotation: the previous secret stays valid for a grace period

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('tenants', sa.Column('webhook_secret_previous', sa.String(length=128), nullable=True))
    op.add_column('tenants', sa.Column('webhook_secret_previous_until', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('tenants', 'webhook_secret_previous_until')
    op.drop_column('tenants', 'webhook_secret_previous')
