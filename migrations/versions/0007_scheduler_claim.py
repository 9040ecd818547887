"""scheduler: claim by policy (a job's place in its tenant's queue, the claim's partial index,
the fair-share usage ledger and the charge cursor of a running job)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

AGING_S = 300.0  # shared.catalog.SCHED_AGING_S_DEFAULT when this was written (existing rows only)


def upgrade() -> None:
    op.add_column('jobs', sa.Column('sched_key', sa.Float(), server_default='0', nullable=False))
    op.add_column('jobs', sa.Column('charged_s', sa.Float(), nullable=True))
    bind = op.get_bind()
    if bind.dialect.name == 'postgresql':
        op.execute(f"UPDATE jobs SET sched_key = extract(epoch FROM created_at) - priority * {AGING_S}")
    else:
        op.execute(f"UPDATE jobs SET sched_key = (julianday(created_at) - 2440587.5) * 86400.0 - priority * {AGING_S}")
    op.create_index('ix_jobs_claim', 'jobs', ['tenant_id', 'type', 'sched_key'], unique=False,
                    postgresql_where=sa.text("status = 'queued'"), sqlite_where=sa.text("status = 'queued'"))
    op.create_table(
        'tenant_usage',
        sa.Column('tenant_id', sa.String(length=32), nullable=False),
        sa.Column('usage_s', sa.Float(), nullable=False),
        sa.Column('updated_s', sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_tenant_usage_tenant_id_tenants'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('tenant_id', name=op.f('pk_tenant_usage')),
    )


def downgrade() -> None:
    op.drop_table('tenant_usage')
    op.drop_index('ix_jobs_claim', table_name='jobs', postgresql_where=sa.text("status = 'queued'"),
                  sqlite_where=sa.text("status = 'queued'"))
    op.drop_column('jobs', 'charged_s')
    op.drop_column('jobs', 'sched_key')
