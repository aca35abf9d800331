"""Bookkeeping tables of batch migrations, in the gallery database itself.

They live on the gallery's declarative `Base` (one metadata, one Alembic history) and are
written in the same transaction as the templates of each chunk. That is what makes a
migration exactly-once: a chunk's templates, its chunk row and the advanced cursor commit
together or not at all, so after a crash (even SIGKILL) the next run starts right after the
last committed chunk, and the primary key (job, chunk number) makes a second writer of the
same chunk fail instead of duplicating it.

Why one row per CHUNK (`migration_chunks`, revision 0009) and not one per source row: a
chunk's templates get one contiguous block of ids in source order, so (first id, the source
ids in order) says which template every row became; one row per source row cost as much
as writing the templates themselves. Per-row `migration_items` are still written where a
client may hold the source ids (ids that are not integers, e.g. CompreFace's image UUIDs,
which the service resolves through them), and they are what jobs before revision 0009 have.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from advplugin.gallery.models import Base, BigId, utcnow


class MigrationJob(Base):
    """One source -> collection migration under one scheme and key."""

    __tablename__ = "migration_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # SHA-256 of (source name, collection, scheme, key id): the same command finds its job.
    name: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(1024))  # description, passwords hidden
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    scheme: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # JSON of the source cursor after the last committed chunk (an id or a row offset).
    cursor: Mapped[str | None] = mapped_column(Text, nullable=True)
    chunks: Mapped[int] = mapped_column(Integer, default=0)
    rows: Mapped[int] = mapped_column(BigInteger, default=0)
    # "running" | "done" | "verified" | "purged"
    state: Mapped[str] = mapped_column(String(16), default="running")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MigrationItem(Base):
    """Which template a source row became (verify excludes a probe's own template, and
    counts prove that every source row arrived exactly once)."""

    __tablename__ = "migration_items"

    job_id: Mapped[int] = mapped_column(
        ForeignKey("migration_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    source_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    template_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("templates.id", ondelete="CASCADE"), index=True
    )


class MigrationChunk(Base):
    """One committed chunk of a job: its templates are the ids first_template_id ..
    last_template_id (contiguous, in source order), `source_ids` the chunk's source ids in
    that order (zlib-compressed JSON list), so row i of the chunk became template
    first_template_id + i. `source_ids` is NULL when the chunk's rows are listed one by one in
    `migration_items` instead (ids a client may hold, or a block of ids that was not contiguous)."""

    __tablename__ = "migration_chunks"

    job_id: Mapped[int] = mapped_column(
        ForeignKey("migration_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    first_template_id: Mapped[int] = mapped_column(BigInteger)
    last_template_id: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(Integer)
    source_ids: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
