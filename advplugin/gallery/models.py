"""SQL schema of the protected gallery (SQLAlchemy 2 typed declarative).

SQL is the source of truth; the FAISS index is a cache derived from `templates` by replaying
`template_changes`. What is deliberately *not* here: raw embeddings (never), secret keys
(they live in key files), plaintext API keys (only their SHA-256), and images unless the
operator turns `store_images` on.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias); BIGINT elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# Stable constraint names so Alembic migrations are identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Collection(Base):
    """A tenant: its own subjects, templates, API keys and FAISS index."""

    __tablename__ = "collections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The collection's operating point (docs/service.md, "What an answer reveals"): the FMR
    # whose calibrated threshold decides a match; NULL: the service's default (revision 0010).
    decision_fmr: Mapped[float | None] = mapped_column(Float, nullable=True)


class Subject(Base):
    __tablename__ = "subjects"
    __table_args__ = (
        UniqueConstraint("collection_id", "name", name="uq_subjects_collection_name"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    # Operator metadata about the person (free JSON); never biometric vectors.
    info: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # Sealed galleries: this subject's data key, sealed under the gallery data key
    # (`advplugin.gallery.sealing`); deleting the subject deletes the key its templates are
    # sealed under. NULL in a gallery that is not (yet) sealed (revision 0005).
    sealed_key: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    templates: Mapped[list[Template]] = relationship(
        back_populates="subject", cascade="all, delete-orphan", passive_deletes=True
    )


class Template(Base):
    """One protected template. Every row says how it was made, so a gallery can be migrated
    (other extractor) or re-keyed (other key) row by row and mixed galleries are detected."""

    __tablename__ = "templates"
    # AUTOINCREMENT on SQLite too: ids are never reused after a delete, so a FAISS id can
    # never silently come to mean a different template.
    # PostgreSQL: keep the ~2 KiB vectors inline in the row (revision 0003, which also sets
    # the vector column's STORAGE EXTERNAL: SQLAlchemy has no option for that).
    __table_args__ = (
        Index("ix_templates_collection_id_id", "collection_id", "id"),
        {"sqlite_autoincrement": True, "postgresql_with": {"toast_tuple_target": 8160}},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    subject_id: Mapped[int] = mapped_column(
        ForeignKey("subjects.id", ondelete="CASCADE"), index=True
    )
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    # float32 little-endian bytes of the *protected* template, `dim` values; in a sealed
    # gallery those bytes AES-256-GCM-sealed under the subject's key: nonce || ct || tag,
    # 4*dim + 28 bytes (`advplugin.gallery.sealing`), so the length tells the two apart.
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    dim: Mapped[int] = mapped_column(Integer)
    scheme: Mapped[str] = mapped_column(String(64))
    scheme_version: Mapped[int] = mapped_column(Integer)
    # 16 hex digits over the scheme's options and weights (`ProtectorMetadata.config_digest`):
    # two configurations of one scheme (e.g. orthogonal and Gaussian `xnn`) make templates in
    # different spaces, which must never be mixed or re-keyed as one (revision 0004).
    config_digest: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    extractor_name: Mapped[str] = mapped_column(String(128))
    extractor_version: Mapped[str] = mapped_column(String(128))
    # SHA-256 of the uploaded image (duplicate detection, audit); never the image itself...
    image_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # ...unless the operator explicitly sets `store_images` (off by default).
    image: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    subject: Mapped[Subject] = relationship(back_populates="templates")


class TemplateChange(Base):
    """The outbox the FAISS index replays: one row per insert, update or delete of a template,
    written in the same transaction as the change itself. An index snapshot records the last
    `seq` it contains; on start it applies every later row, so a crash between the SQL commit
    and the index write can never lose an enrolment or resurrect a deleted template."""

    __tablename__ = "template_changes"
    __table_args__ = (
        Index("ix_template_changes_collection_id_seq", "collection_id", "seq"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(BigId, primary_key=True)
    collection_id: Mapped[int] = mapped_column(Integer)
    template_id: Mapped[int] = mapped_column(BigInteger)
    op: Mapped[str] = mapped_column(String(8))  # "upsert" | "delete"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SealingKey(Base):
    """A gallery data key, wrapped by the master key (which never enters the database), and
    the gallery's sealing state. No row: the gallery is not sealed. Several rows only while
    the gallery is re-keyed (`advplugin db rewrap --new-data-key`): the newest (largest
    `serial`) seals new subject keys, older ones still open the subject keys not yet moved."""

    __tablename__ = "sealing_keys"

    serial: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    key_id: Mapped[str] = mapped_column(String(16))  # one-way id of the data key
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)  # the data key under the master key
    master_key_id: Mapped[str] = mapped_column(String(128))  # which master key wraps it
    # True from `advplugin db seal` until no unsealed template remains; meanwhile plaintext
    # rows are still read, afterwards one is refused as tampering.
    converting: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PendingErasure(Base):
    """A deleted subject whose erasure key (kept outside the database,
    `advplugin.gallery.erasure`) is still to be shredded: written in the delete's own
    transaction, removed once the key is gone. Why an outbox: the store is another database,
    so the shred cannot commit with the delete; a crash between the two must not leave the
    key alive forever (every copy of the database made before the delete would keep opening
    the subject), so whatever is pending is shredded at the next delete or start-up. The row
    holds the subject's sealed key (under the gallery data key, as in its `subjects` row
    before): the store's reference to the erasure key is derived from it."""

    __tablename__ = "pending_erasures"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    collection_id: Mapped[int] = mapped_column(Integer)  # no foreign key: outlives the subject
    name: Mapped[str] = mapped_column(String(255))
    sealed_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SubjectRename(Base):
    """A subject whose stored name is not in the canonical form (`canonical_name`: NFC,
    trimmed, no control characters), found by the upgrade to revision 0011, with the name it
    is to take. The service completes each at start-up (`complete_subject_renames`), through
    the same serialised rename as the API's, because a sealed subject's key is bound to its
    name and only an unlocked gallery can re-seal it; then the row goes.

    `new_name` is the canonical form, or, where that is taken (two names that only look
    different), the canonical form plus " (subject <id>)": never a silent merge."""

    __tablename__ = "subject_renames"

    subject_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    collection_id: Mapped[int] = mapped_column(Integer)
    old_name: Mapped[str] = mapped_column(String(255))
    new_name: Mapped[str] = mapped_column(String(255))
    collision: Mapped[bool] = mapped_column(Boolean)


class ApiKey(Base):
    """An API key of one collection, stored as SHA-256 only (the key is 256 random bits, so
    a plain hash is enough; no slow KDF is needed as for passwords)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    # What the key may do: "identify" (read and match), "enrol" (also enrol and delete),
    # "admin" (also the audit trail). The server default keeps keys made before revision
    # 0007 at the full rights they had.
    scope: Mapped[str] = mapped_column(String(16), server_default="admin")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Revision 0010 (the answer policy, `advplugin.service.answers`): whether answers to this
    # key carry exact similarities (granted by an admin, audited; off: decisions and bands),
    # and this key's budgets where they differ from the service's (NULL: the default).
    exact_scores: Mapped[bool] = mapped_column(Boolean, server_default=false())
    budget_unmatched: Mapped[int | None] = mapped_column(Integer, nullable=True)
    budget_lookalikes: Mapped[int | None] = mapped_column(Integer, nullable=True)


class KeyUsage(Base):
    """What one API key was answered, per hour (`hour` = Unix time // 3600): the budget's
    counters (`advplugin.gallery.budgets`). In the gallery's database, so replicas share them
    and a restart keeps them; rows older than the budget window are deleted as they age."""

    __tablename__ = "key_usage"

    api_key_id: Mapped[int] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    hour: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    probes: Mapped[int] = mapped_column(Integer, default=0)
    # Faces that matched no one (or failed a verification).
    unmatched: Mapped[int] = mapped_column(Integer, default=0)
    # Weak matches (below the strong band) naming a subject not named to this key within the
    # window: the look-alike disclosures that reconstruct people.
    lookalikes: Mapped[int] = mapped_column(Integer, default=0)
    # Requests refused by the budget (the first one of an hour writes the audit event).
    refused: Mapped[int] = mapped_column(Integer, default=0)


class KeyDisclosure(Base):
    """Which subjects an API key was told about, and when last (hour), weakly or strongly:
    what makes a weak match *new* (a look-alike) and what earns a key credit (distinct subjects
    strongly matched: a camera at a door, not an attacker). Names, never vectors; deleted with
    the subject (same transaction) and once older than the window."""

    __tablename__ = "key_disclosures"

    api_key_id: Mapped[int] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    collection_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_hour: Mapped[int] = mapped_column(Integer)
    strong_hour: Mapped[int | None] = mapped_column(Integer, nullable=True)


class AuditEvent(Base):
    """Who changed what and when: one row per enrolment (per subject), subject deletion and
    API-key operation, written in the same transaction as the change, so neither can exist
    without the other. Deliberately no vectors, images or keys: only ids, names and counts.
    No foreign keys: the trail outlives revoked keys and deleted subjects."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_collection_id_id", "collection_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    collection_id: Mapped[int] = mapped_column(Integer)
    api_key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: CLI, bulk
    actor: Mapped[str] = mapped_column(String(64))  # "api-key", "cli", "service", ...
    action: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str | None] = mapped_column(String(255), nullable=True)
    template_count: Mapped[int | None] = mapped_column(Integer, nullable=True)


class BlindBlock(Base):
    """A block of a blind collection (docs/blind.md): up to `capacity` templates as CKKS
    ciphertexts, one per dimension (slot s of ciphertext d = dimension d of the template in
    slot s), packed in `data` (`advplugin.he.ServerContext.pack_block`). The server cannot
    decrypt them: it holds no key. `fill` is the next free slot (enrolments append at it,
    checked in the write transaction); `version` grows with every change, which is what the
    in-memory encrypted index follows. Deleted templates leave their slot dead (its score is
    simply not reported) until the key holder re-packs the gallery."""

    __tablename__ = "blind_blocks"
    __table_args__ = (
        Index("ix_blind_blocks_collection_id_id", "collection_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    # The key id of the client's HE secret key (a one-way digest) and of the parameters.
    he_key_id: Mapped[str] = mapped_column(String(16))
    params_digest: Mapped[str] = mapped_column(String(16))
    capacity: Mapped[int] = mapped_column(Integer)
    fill: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BlindTemplate(Base):
    """One encrypted template of a blind collection: its subject, and where it sits (block,
    slot). The vector itself exists only inside the block's ciphertexts."""

    __tablename__ = "blind_templates"
    __table_args__ = (
        UniqueConstraint("block_id", "slot", name="uq_blind_templates_block_slot"),
        Index("ix_blind_templates_collection_id_id", "collection_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    subject_id: Mapped[int] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"), index=True)
    block_id: Mapped[int] = mapped_column(ForeignKey("blind_blocks.id", ondelete="CASCADE"))
    slot: Mapped[int] = mapped_column(Integer)
    # How the template was protected before encryption (as `templates` records it).
    scheme: Mapped[str] = mapped_column(String(64))
    config_digest: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    extractor_name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
