"""The answer policy (docs/service.md, "What an answer reveals"): per-key exact-score
capability and budgets (`api_keys`), a collection's operating point (`collections`), and the
budget's counters (`key_usage`, `key_disclosures`).

Additions only: nullable columns, or NOT NULL with a constant default (a plain `ALTER TABLE
ADD COLUMN` on SQLite, no table rebuild, so no cascade can fire), and two new tables.
Existing keys get `exact_scores = false`: after the upgrade they are answered with decisions,
not measurements, until an admin grants exact scores (`advplugin db api-key set`).

Revision ID: 0010_answer_policy
Revises: 0009_migration_chunks
Create Date: 2026-12-06 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_answer_policy"
down_revision = "0009_migration_chunks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("collections", sa.Column("decision_fmr", sa.Float(), nullable=True))
    op.add_column("api_keys", sa.Column("exact_scores", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column("api_keys", sa.Column("budget_unmatched", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("budget_lookalikes", sa.Integer(), nullable=True))
    op.create_table(
        "key_usage",
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("hour", sa.Integer(), nullable=False),
        sa.Column("probes", sa.Integer(), nullable=False),
        sa.Column("unmatched", sa.Integer(), nullable=False),
        sa.Column("lookalikes", sa.Integer(), nullable=False),
        sa.Column("refused", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["api_key_id"], ["api_keys.id"], name=op.f("fk_key_usage_api_key_id_api_keys"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("api_key_id", "hour", name=op.f("pk_key_usage")),
    )
    op.create_table(
        "key_disclosures",
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("last_hour", sa.Integer(), nullable=False),
        sa.Column("strong_hour", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["api_key_id"], ["api_keys.id"], name=op.f("fk_key_disclosures_api_key_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("api_key_id", "collection_id", "subject", name=op.f("pk_key_disclosures")),
    )


def downgrade() -> None:
    op.drop_table("key_disclosures")
    op.drop_table("key_usage")
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table, column in (("api_keys", "budget_lookalikes"), ("api_keys", "budget_unmatched"),
                          ("api_keys", "exact_scores"), ("collections", "decision_fmr")):
        if sqlite:  # DROP COLUMN without a table rebuild (SQLite >= 3.35), so no cascade can fire
            op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        else:
            op.drop_column(table, column)
