"""scheduling fields: per-tenant weight and quotas, per-job priority (spec 1.1 "Scheduling")

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('tenants', sa.Column('weight', sa.Float(), server_default='1', nullable=False))
    op.add_column('tenants', sa.Column('max_running', sa.Integer(), nullable=True))
    op.add_column('tenants', sa.Column('max_queued_images', sa.Integer(), nullable=True))
    op.add_column('tenants', sa.Column('rate_per_s', sa.Float(), nullable=True))
    op.add_column('tenants', sa.Column('rate_burst', sa.Integer(), nullable=True))
    op.add_column('jobs', sa.Column('priority', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    op.drop_column('jobs', 'priority')
    for name in ('rate_burst', 'rate_per_s', 'max_queued_images', 'max_running', 'weight'):
        op.drop_column('tenants', name)
