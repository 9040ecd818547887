"""job pieces: a big sample job is split into child rows of ``jobs`` that workers claim apart

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('pieces', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('parent_id', sa.String(length=32), nullable=True))
        batch.add_column(sa.Column('item_start', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('item_end', sa.Integer(), nullable=True))
        batch.create_foreign_key(batch.f('fk_jobs_parent_id_jobs'), 'jobs', ['parent_id'], ['id'], ondelete='CASCADE')
        batch.create_index(batch.f('ix_jobs_parent_id'), ['parent_id'], unique=False,
                           postgresql_where=sa.text('parent_id IS NOT NULL'),
                           sqlite_where=sa.text('parent_id IS NOT NULL'))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index(batch.f('ix_jobs_parent_id'))
        batch.drop_constraint(batch.f('fk_jobs_parent_id_jobs'), type_='foreignkey')
        batch.drop_column('item_end')
        batch.drop_column('item_start')
        batch.drop_column('parent_id')
        batch.drop_column('pieces')
