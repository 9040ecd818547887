"""jobs.charge_share: the part of its run's time a co-batched job is charged to fair share

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('charge_share', sa.Float(), server_default='1', nullable=False))


def downgrade() -> None:
    op.drop_column('jobs', 'charge_share')
