"""Batch-migration progress per chunk (`migration_chunks`, `advplugin.bulk.models.MigrationChunk`):
one row per committed chunk (its contiguous template id block and its source ids, compressed)
instead of one `migration_items` row per source row, which cost as much as the templates.

Addition only: a new table. Jobs started before keep their `migration_items` rows (verify
reads both), and a running job resumed after the upgrade continues at its cursor, recording
its further chunks here (their numbers continue after the job's `chunks`).

Revision ID: 0009_migration_chunks
Revises: 0008_pending_erasures
Create Date: 2026-11-30 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_migration_chunks"
down_revision = "0008_pending_erasures"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "migration_chunks",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("first_template_id", sa.BigInteger(), nullable=False),
        sa.Column("last_template_id", sa.BigInteger(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("source_ids", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["migration_jobs.id"], name=op.f("fk_migration_chunks_job_id_migration_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "seq", name=op.f("pk_migration_chunks")),
    )


def downgrade() -> None:
    op.drop_table("migration_chunks")
