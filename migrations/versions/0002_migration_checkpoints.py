"""Batch-migration bookkeeping: migration_jobs (cursor per job), migration_items (source id ->
template id). Owned by advplugin.bulk (models in advplugin/bulk/models.py).

Revision ID: 0002_migration_checkpoints
Revises: 0001
Create Date: 2026-11-22 09:49:22.336505
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002_migration_checkpoints'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('migration_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=1024), nullable=False),
    sa.Column('collection_id', sa.Integer(), nullable=False),
    sa.Column('scheme', sa.String(length=64), nullable=False),
    sa.Column('key_id', sa.String(length=64), nullable=True),
    sa.Column('cursor', sa.Text(), nullable=True),
    sa.Column('chunks', sa.Integer(), nullable=False),
    sa.Column('rows', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['collection_id'], ['collections.id'], name=op.f('fk_migration_jobs_collection_id_collections'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_migration_jobs')),
    sa.UniqueConstraint('name', name=op.f('uq_migration_jobs_name'))
    )
    op.create_table('migration_items',
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('source_id', sa.String(length=255), nullable=False),
    sa.Column('template_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['migration_jobs.id'], name=op.f('fk_migration_items_job_id_migration_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['template_id'], ['templates.id'], name=op.f('fk_migration_items_template_id_templates'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'source_id', name=op.f('pk_migration_items'))
    )
    with op.batch_alter_table('migration_items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_migration_items_template_id'), ['template_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('migration_items', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_migration_items_template_id'))

    op.drop_table('migration_items')
    op.drop_table('migration_jobs')
