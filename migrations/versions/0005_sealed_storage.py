"""Sealed storage: `sealing_keys` (the gallery data key, wrapped by the master key) and
`subjects.sealed_key` (each subject's data key, sealed under the gallery key).

Nothing existing changes: a gallery stays unsealed (template vectors in plaintext, both
columns empty) until `advplugin db seal` converts it, or the service seals it while it is
still empty. Both steps are additions only, so no table is rebuilt on SQLite (a nullable
column is a plain `ALTER TABLE ADD COLUMN`), and on PostgreSQL they are catalogue changes.

Revision ID: 0005_sealed_storage
Revises: 0004_templates_config_digest
Create Date: 2026-11-30 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_sealed_storage"
down_revision = "0004_templates_config_digest"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sealing_keys",
        sa.Column("serial", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("master_key_id", sa.String(length=128), nullable=False),
        sa.Column("converting", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_sealing_keys")),
    )
    with op.batch_alter_table("subjects") as batch:
        batch.add_column(sa.Column("sealed_key", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    bind = op.get_bind()
    sealed = bind.execute(sa.text("SELECT count(*) FROM sealing_keys")).scalar()
    if sealed:
        raise RuntimeError(
            f"revision {revision}: this gallery is sealed; an older advplugin cannot read its "
            "templates. Nothing was changed."
        )
    if bind.dialect.name == "sqlite":
        # DROP COLUMN without a table rebuild (SQLite >= 3.35), so no cascade can fire.
        op.execute("ALTER TABLE subjects DROP COLUMN sealed_key")
    else:
        op.drop_column("subjects", "sealed_key")
    op.drop_table("sealing_keys")
