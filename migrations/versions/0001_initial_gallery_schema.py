"""Initial gallery schema: collections, subjects, templates, template_changes (the index
outbox), api_keys (hashes only).

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-22 09:47:46.010810
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('collections',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_collections')),
    sa.UniqueConstraint('name', name=op.f('uq_collections_name'))
    )
    op.create_table('template_changes',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('collection_id', sa.Integer(), nullable=False),
    sa.Column('template_id', sa.BigInteger(), nullable=False),
    sa.Column('op', sa.String(length=8), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_template_changes')),
    sqlite_autoincrement=True,
    )
    with op.batch_alter_table('template_changes', schema=None) as batch_op:
        batch_op.create_index('ix_template_changes_collection_id_seq', ['collection_id', 'seq'], unique=False)

    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('collection_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('key_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['collection_id'], ['collections.id'], name=op.f('fk_api_keys_collection_id_collections'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_sha256', name=op.f('uq_api_keys_key_sha256'))
    )
    op.create_table('subjects',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('collection_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('info', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['collection_id'], ['collections.id'], name=op.f('fk_subjects_collection_id_collections'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subjects')),
    sa.UniqueConstraint('collection_id', 'name', name='uq_subjects_collection_name'),
    sqlite_autoincrement=True,
    )
    op.create_table('templates',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('subject_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('collection_id', sa.Integer(), nullable=False),
    sa.Column('vector', sa.LargeBinary(), nullable=False),
    sa.Column('dim', sa.Integer(), nullable=False),
    sa.Column('scheme', sa.String(length=64), nullable=False),
    sa.Column('scheme_version', sa.Integer(), nullable=False),
    sa.Column('key_id', sa.String(length=64), nullable=True),
    sa.Column('extractor_name', sa.String(length=128), nullable=False),
    sa.Column('extractor_version', sa.String(length=128), nullable=False),
    sa.Column('image_sha256', sa.String(length=64), nullable=True),
    sa.Column('image', sa.LargeBinary(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['collection_id'], ['collections.id'], name=op.f('fk_templates_collection_id_collections'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['subject_id'], ['subjects.id'], name=op.f('fk_templates_subject_id_subjects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_templates')),
    sqlite_autoincrement=True,
    )
    with op.batch_alter_table('templates', schema=None) as batch_op:
        batch_op.create_index('ix_templates_collection_id_id', ['collection_id', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_templates_key_id'), ['key_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_templates_subject_id'), ['subject_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('templates', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_templates_subject_id'))
        batch_op.drop_index(batch_op.f('ix_templates_key_id'))
        batch_op.drop_index('ix_templates_collection_id_id')

    op.drop_table('templates')
    op.drop_table('subjects')
    op.drop_table('api_keys')
    with op.batch_alter_table('template_changes', schema=None) as batch_op:
        batch_op.drop_index('ix_template_changes_collection_id_seq')

    op.drop_table('template_changes')
    op.drop_table('collections')
