"""job shards: the WebDataset tar shards of sample jobs with output_format webdataset

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'job_shards',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('shard', sa.Integer(), nullable=False),
        sa.Column('key', sa.Text(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('bytes', sa.BigInteger(), nullable=False),
        sa.Column('images', sa.Integer(), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_shards_job_id_jobs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_job_shards')),
        sa.UniqueConstraint('job_id', 'shard', name='uq_job_shards_shard'),
    )
    op.create_index(op.f('ix_job_shards_job_id'), 'job_shards', ['job_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_job_shards_job_id'), table_name='job_shards')
    op.drop_table('job_shards')
