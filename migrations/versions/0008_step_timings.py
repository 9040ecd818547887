"""step timings: measured seconds per denoising / training step, for honest estimates

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'step_timings',
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('model_key', sa.String(length=80), nullable=False),
        sa.Column('size', sa.String(length=32), nullable=False),
        sa.Column('batch', sa.Integer(), nullable=False),
        sa.Column('guidance', sa.Boolean(), nullable=False),
        sa.Column('device', sa.String(length=120), nullable=False),
        sa.Column('seconds', sa.Float(), nullable=False),
        sa.Column('samples', sa.Integer(), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('kind', 'model_key', 'size', 'batch', 'guidance', 'device', name=op.f('pk_step_timings')),
    )


def downgrade() -> None:
    op.drop_table('step_timings')
