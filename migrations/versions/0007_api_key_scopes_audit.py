"""API-key scopes (`api_keys.scope`) and the audit trail (`audit_events`).

Additions only. Every existing key gets the server default scope 'admin', i.e. exactly the
rights it had before (there were no scopes); new keys choose theirs. On SQLite the column is
a plain `ALTER TABLE ADD COLUMN` (a NOT NULL column with a constant default needs no table
rebuild, so no cascade can fire); on PostgreSQL a catalogue change.

Revision ID: 0007_api_key_scopes_audit
Revises: 0006_blind_blocks
Create Date: 2026-11-30 08:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_api_key_scopes_audit"
down_revision = "0006_blind_blocks"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(
            sa.Column("scope", sa.String(length=16), server_default="admin", nullable=False)
        )
    op.create_table(
        "audit_events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=True),
        sa.Column("template_count", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_audit_events_collection_id_id", "audit_events", ["collection_id", "id"])


def downgrade() -> None:
    op.drop_table("audit_events")
    if op.get_bind().dialect.name == "sqlite":
        # DROP COLUMN without a table rebuild (SQLite >= 3.35), so no cascade can fire.
        op.execute("ALTER TABLE api_keys DROP COLUMN scope")
    else:
        op.drop_column("api_keys", "scope")
