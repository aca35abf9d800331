"""templates.config_digest: which configuration of its scheme made each template.

`ProtectorMetadata.config_digest` (16 hex digits over the scheme's options and the SHA-256
of its weights) tells apart templates that share scheme and version but live in different
spaces, e.g. an orthogonal and a Gaussian `xnn`. Every row records it from now on, so such
templates are never mixed, searched or re-keyed as one.

Backfill: every template written before this column existed was made with its scheme's
default options, whose digests are frozen below as literals (a migration must not import
runtime code that may change later). Rows of any other (scheme, version) make the upgrade
fail, naming them, before anything is changed.

How: the column is added NOT NULL with the `xnn` v1 digest as its server default (on
PostgreSQL 11+ that is a catalogue change, no table rewrite, for what is usually every
row), the other known schemes are updated, and the default is dropped again (the gallery
always writes the digest itself). On SQLite dropping a default rebuilds the table (batch
mode); the rebuild keeps AUTOINCREMENT and its high-water mark (template ids are never
reused: a FAISS id must never come to mean another template), and must run with foreign
keys off, else dropping the old table would cascade-delete `migration_items`
(`advplugin.gallery.schema.upgrade` does that; this revision refuses otherwise).

Revision ID: 0004_templates_config_digest
Revises: 0003_templates_inline_vectors
Create Date: 2026-11-30 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0004_templates_config_digest"
down_revision = "0003_templates_inline_vectors"
branch_labels = None
depends_on = None

# advplugin.protectors.scheme_info(name).config_digest(128) of each scheme's default options
# when this revision was written (tests/gallery/test_migrations.py checks them).
BACKFILL: dict[tuple[str, int], str] = {
    ("xnn", 1): "56e95684cf0b1a5c",  # matrix="orthogonal", any dimension
    ("advface", 1): "27ed4ecf655e925d",  # the shipped 128-d weights
    ("none", 1): "0a187bd88a28c72f",
}
_MOST_ROWS = ("xnn", 1)  # the server default while the column is added
_PG_WRITE_LOCK = 0x61647670  # the gallery writers' advisory lock (advplugin.gallery.database)

_templates = sa.table(
    "templates",
    sa.column("scheme", sa.String),
    sa.column("scheme_version", sa.Integer),
    sa.column("config_digest", sa.String),
)


def upgrade() -> None:
    bind = _online_bind()
    if bind.dialect.name == "postgresql":
        # No gallery writer may slip a row in between the check below and the backfill.
        bind.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")
    present = bind.execute(sa.text("SELECT DISTINCT scheme, scheme_version FROM templates")).all()
    unknown = sorted({(str(s), int(v)) for s, v in present} - set(BACKFILL))
    if unknown:
        named = ", ".join(f"{s!r} v{v}" for s, v in unknown)
        raise RuntimeError(
            f"revision {revision}: templates of scheme {named} have no known config digest "
            f"(this revision knows {', '.join(f'{s!r} v{v}' for s, v in BACKFILL)}); "
            "re-protect or delete those templates, or upgrade with an advplugin that knows "
            "the scheme, then run the upgrade again. Nothing was changed."
        )
    high_water = _sqlite_before_rebuild(bind)
    with op.batch_alter_table("templates", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.add_column(
            sa.Column(
                "config_digest", sa.String(length=16), nullable=False,
                server_default=BACKFILL[_MOST_ROWS],
            )
        )
    for (scheme, version), digest in BACKFILL.items():
        if (scheme, version) != _MOST_ROWS:
            op.execute(
                _templates.update()
                .where(_templates.c.scheme == scheme, _templates.c.scheme_version == version)
                .values(config_digest=digest)
            )
    with op.batch_alter_table("templates", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.alter_column(
            "config_digest", existing_type=sa.String(length=16), existing_nullable=False,
            server_default=None,
        )
    _sqlite_after_rebuild(bind, high_water)


def downgrade() -> None:
    bind = _online_bind()
    high_water = _sqlite_before_rebuild(bind)
    with op.batch_alter_table("templates", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_column("config_digest")
    _sqlite_after_rebuild(bind, high_water)


def _online_bind() -> sa.Connection:
    if context.is_offline_mode():
        raise RuntimeError(
            f"revision {revision} backfills from the rows present and cannot be rendered as "
            "offline SQL; run it online (`advplugin db upgrade`)"
        )
    return op.get_bind()


def _sqlite_before_rebuild(bind: sa.Connection) -> int | None:
    """SQLite: refuse to rebuild with foreign keys on; return AUTOINCREMENT's high-water mark."""
    if bind.dialect.name != "sqlite":
        return None
    if bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError(
            f"revision {revision} rebuilds the SQLite table `templates`; with foreign keys "
            "on, dropping the old table would cascade-delete dependent rows "
            "(migration_items). Run it with `advplugin db upgrade` (which turns them off "
            "for the migration), or on a connection with PRAGMA foreign_keys=OFF."
        )
    return bind.exec_driver_sql(
        "SELECT seq FROM sqlite_sequence WHERE name = 'templates'"
    ).scalar()


def _sqlite_after_rebuild(bind: sa.Connection, high_water: int | None) -> None:
    """SQLite: the rebuilt table's AUTOINCREMENT mark is the largest id copied; put the old
    one back so that ids of deleted templates are never handed out again."""
    if bind.dialect.name != "sqlite" or high_water is None:
        return
    params = {"seq": int(high_water)}
    updated = bind.execute(
        sa.text("UPDATE sqlite_sequence SET seq = max(seq, :seq) WHERE name = 'templates'"),
        params,
    ).rowcount
    if not updated:
        bind.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('templates', :seq)"), params)
