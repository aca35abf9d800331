"""Blind collections (docs/blind.md): `blind_blocks` (CKKS ciphertexts of packed templates)
and `blind_templates` (which subject sits in which block and slot).

Additions only: two new tables, nothing existing changes.

Revision ID: 0006_blind_blocks
Revises: 0005_sealed_storage
Create Date: 2026-11-30 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_blind_blocks"
down_revision = "0005_sealed_storage"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "blind_blocks",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("he_key_id", sa.String(length=16), nullable=False),
        sa.Column("params_digest", sa.String(length=16), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("fill", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["collection_id"], ["collections.id"], ondelete="CASCADE",
            name=op.f("fk_blind_blocks_collection_id_collections"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blind_blocks")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_blind_blocks_collection_id_id", "blind_blocks", ["collection_id", "id"])
    op.create_table(
        "blind_templates",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("subject_id", BigId, nullable=False),
        sa.Column("block_id", BigId, nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("scheme", sa.String(length=64), nullable=False),
        sa.Column("config_digest", sa.String(length=16), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=True),
        sa.Column("extractor_name", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["collection_id"], ["collections.id"], ondelete="CASCADE",
            name=op.f("fk_blind_templates_collection_id_collections"),
        ),
        sa.ForeignKeyConstraint(
            ["subject_id"], ["subjects.id"], ondelete="CASCADE",
            name=op.f("fk_blind_templates_subject_id_subjects"),
        ),
        sa.ForeignKeyConstraint(
            ["block_id"], ["blind_blocks.id"], ondelete="CASCADE",
            name=op.f("fk_blind_templates_block_id_blind_blocks"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blind_templates")),
        sa.UniqueConstraint("block_id", "slot", name="uq_blind_templates_block_slot"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_blind_templates_collection_id_id", "blind_templates", ["collection_id", "id"])
    op.create_index(op.f("ix_blind_templates_subject_id"), "blind_templates", ["subject_id"])


def downgrade() -> None:
    op.drop_table("blind_templates")
    op.drop_table("blind_blocks")
