"""Subject names in one canonical form (docs/gallery.md, "Subject names"): finds the stored
names that are not (NFD or other non-NFC text, leading or trailing blanks, control
characters) and records, in `subject_renames`, the canonical name each is to take. Names
that would collide under the canonical form (one subject "é" as one code point, another as
"e" + combining accent) are not merged: the later one takes "<name> (subject <id>)". Each is
reported here; the service completes the renames at its next start (a sealed subject's key is
bound to its name, and only an unlocked gallery can re-seal it).

Additions only: one new table.

Revision ID: 0011_canonical_names
Revises: 0010_answer_policy
Create Date: 2026-12-06 11:30:00
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

from advplugin.gallery.names import planned_renames

revision = "0011_canonical_names"
down_revision = "0010_answer_policy"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")


def upgrade() -> None:
    table = op.create_table(
        "subject_renames",
        sa.Column("subject_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("old_name", sa.String(length=255), nullable=False),
        sa.Column("new_name", sa.String(length=255), nullable=False),
        sa.Column("collision", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("subject_id", name=op.f("pk_subject_renames")),
    )
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, collection_id, name FROM subjects ORDER BY id")).all()
    renames = planned_renames([(int(r[0]), int(r[1]), str(r[2])) for r in rows])
    for r in renames:
        log.warning(
            "subject %d (collection %d): name %r is not canonical; it becomes %r at the service's "
            "next start%s", r["subject_id"], r["collection_id"], r["old_name"], r["new_name"],
            " (its canonical form is another subject's name: not merged)" if r["collision"] else "",
        )
    if renames:
        op.bulk_insert(table, renames)


def downgrade() -> None:
    op.drop_table("subject_renames")
