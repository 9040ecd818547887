"""input images: uploaded init images and masks (image-to-image, inpainting), and the rows that use them

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'input_images',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('tenant_id', sa.String(length=32), nullable=False),
        sa.Column('key', sa.Text(), nullable=False),
        sa.Column('format', sa.String(length=8), nullable=False),
        sa.Column('width', sa.Integer(), nullable=False),
        sa.Column('height', sa.Integer(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('bytes', sa.BigInteger(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_input_images_tenant_id_tenants'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_input_images')),
    )
    op.create_index('ix_input_images_tenant_created', 'input_images', ['tenant_id', 'created_at'], unique=False)
    op.add_column('job_rows', sa.Column('init_image', sa.String(length=32), nullable=True))
    op.add_column('job_rows', sa.Column('strength', sa.Float(), nullable=True))
    op.add_column('job_rows', sa.Column('mask_image', sa.String(length=32), nullable=True))


def downgrade() -> None:
    op.drop_column('job_rows', 'mask_image')
    op.drop_column('job_rows', 'strength')
    op.drop_column('job_rows', 'init_image')
    op.drop_index('ix_input_images_tenant_created', table_name='input_images')
    op.drop_table('input_images')
