"""The erasure outbox (`pending_erasures`): deleted subjects whose erasure keys, held outside
the database, are still to be shredded (`advplugin.gallery.models.PendingErasure`).

Addition only: a new table, nothing existing changes.

Revision ID: 0008_pending_erasures
Revises: 0007_api_key_scopes_audit
Create Date: 2026-11-30 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_pending_erasures"
down_revision = "0007_api_key_scopes_audit"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "pending_erasures",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("sealed_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pending_erasures")),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("pending_erasures")
