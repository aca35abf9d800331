"""`TemplateRepository`: protected templates and their subjects, with per-row provenance.

Why a room of its own: this is where the per-dialect bulk SQL lives (one-statement inserts
on PostgreSQL, one `executemany` on SQLite) and the rules that keep the FAISS index right:

* every change of a template writes its `template_changes` entry in the same transaction
  (`ChangeLog._log*`), so the index, a cache, can always catch up by replaying the log;
* template ids are never reused (PostgreSQL: the column's sequence; SQLite: AUTOINCREMENT
  and, for the ids this module allocates itself, its high-water mark under the serialised
  write lock), so a FAISS id can never silently come to mean another template;
* every row records how it was made (scheme, version, `config_digest`, key id, extractor),
  so a gallery can be migrated or re-keyed row by row and mixed galleries are detected.

Vectors are stored as float32 bytes of *protected* templates, sealed (AES-256-GCM under the
subject's key, bound to the row: `advplugin.gallery.sealing`) when the gallery is sealed
(`advplugin.gallery.sealkeys`); every read and write of a vector goes through this module,
so whatever reads templates (index rebuild and catch-up, matching, migration, rotation,
evaluation) works on sealed and unsealed galleries alike. It refuses arrays that are not
float32-compatible [N, dim] and never logs or echoes vector values.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import (
    Connection,
    ScalarSelect,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from advplugin.gallery.changelog import ChangeLog
from advplugin.gallery.database import (
    DEFAULT_COLLECTION,
    bound_value,
    pg_copy,
    pg_copy_rows,
    pg_int4,
    pg_text,
    pg_timestamptz,
)
from advplugin.gallery.models import PendingErasure, Subject, SubjectRename, Template, utcnow
from advplugin.gallery.sealing import (
    ERASABLE_SUBJECT_KEY_BYTES,
    SUBJECT_KEY_BYTES,
    MasterKeyError,
    Sealer,
    TamperedError,
    sealed_size,
    template_ad,
)
from advplugin.gallery.sealkeys import MASTER_KEY_HINT, GalleryKeys
from advplugin.protectors.base import ProtectorMetadata, validate_embeddings

log = logging.getLogger(__name__)

_IN_CHUNK = 500  # ids per IN (...) clause, well under every driver's parameter limit
_DIGEST = re.compile(r"[0-9a-f]{16}")

# PostgreSQL bulk insert of one chunk in one statement: the vectors travel as ONE bytea
# parameter (binary, no escaping) cut into rows by the server, the other per-row values as
# arrays, per-chunk values once. No per-row SQL text is built or parsed on either side.
_PG_INSERT_TEMPLATES = text(
    """
    INSERT INTO templates (id, subject_id, collection_id, vector, dim, scheme, scheme_version,
        config_digest, key_id, extractor_name, extractor_version, image_sha256, image,
        created_at, updated_at)
    SELECT u.id, u.subject_id, :collection_id,
        substring(CAST(:vectors AS BYTEA) FROM CAST((u.n - 1) * :nbytes + 1 AS INTEGER)
                  FOR CAST(:nbytes AS INTEGER)),
        :dim, :scheme, :scheme_version, :config_digest, :key_id, :extractor_name,
        :extractor_version, u.image_sha256, u.image, :created_at, :updated_at
    FROM unnest(CAST(:id AS BIGINT[]), CAST(:subject_id AS BIGINT[]),
                CAST(:image_sha256 AS VARCHAR[]), CAST(:image AS BYTEA[]))
        WITH ORDINALITY AS u(id, subject_id, image_sha256, image, n)
    ORDER BY u.n
    """
)

# SQLite's counterpart (ids contiguous from :first, see `_next_ids`; json_each's key is the
# row's position).
_SQLITE_INSERT_TEMPLATES = (
    "INSERT INTO templates (id, subject_id, collection_id, vector, dim, scheme, scheme_version, "
    "config_digest, key_id, extractor_name, extractor_version, created_at, updated_at) "
    "SELECT :first + j.key, j.value, :collection_id, substr(:vectors, j.key * :nbytes + 1, :nbytes), "
    ":dim, :scheme, :scheme_version, :config_digest, :key_id, :extractor_name, :extractor_version, "
    ":created_at, :updated_at FROM json_each(:subject_ids) AS j ORDER BY j.key"
)

_SQLITE_INSERT_SUBJECTS = (
    "INSERT INTO subjects (id, collection_id, name, sealed_key, created_at) "
    "SELECT :first + j.key, :cid, j.value, "
    "CASE WHEN :width > 0 THEN substr(:keys, j.key * :width + 1, :width) END, :created_at "
    "FROM json_each(:names) AS j ORDER BY j.key"
)
# One unique-index probe per name, whatever the planner's statistics say: with `name IN
# (...)` a bulk load that outran autovacuum's ANALYZE got a plan that filtered every subject
# of the collection against the whole list, a cost that grew with the table (O(N^2) overall).
# The names travel as ONE JSON text (psycopg escapes a text array element by element,
# which cost more than the lookup).
_PG_FIND_SUBJECTS = text(
    "SELECT n.name, s.id, s.sealed_key FROM json_array_elements_text(CAST(:names AS JSON)) AS n(name) "
    "CROSS JOIN LATERAL (SELECT id, sealed_key FROM subjects "
    "WHERE collection_id = :cid AND name = n.name) AS s"
)


class SubjectNotFound(KeyError):
    """No subject of that name in the collection."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0]) if self.args else "subject not found"


@dataclass(frozen=True)
class TemplateBatch:
    """A chunk of stored templates in id order; per-row provenance for migration/rotation."""

    ids: np.ndarray  # int64 [n]
    subjects: list[str]
    vectors: np.ndarray  # float32 [n, dim], protected templates
    scheme: list[str]
    scheme_version: list[int]
    key_id: list[str | None]
    extractor_name: list[str]
    extractor_version: list[str]
    config_digest: list[str]  # the scheme's options + weights (ProtectorMetadata.config_digest)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"TemplateBatch(n={len(self)}, ids={int(self.ids[0]) if len(self) else None}..)"


class StoredTemplate(NamedTuple):
    subject: str
    key_id: str | None
    vector: np.ndarray  # float32 [dim], protected


@dataclass(frozen=True)
class SubjectInfo:
    name: str
    template_count: int
    created_at: datetime
    info: dict | None


def _to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


class _Sealed(NamedTuple):
    """A subject as a write needs it: its id and its sealed key (None: unsealed gallery),
    and for a subject made by this write its template cipher (no unwrap, no store lookup)."""

    id: int
    key: bytes | None
    cipher: Any = None


def _chunks(seq: Sequence, n: int = _IN_CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def check_text(value: object, what: str, max_length: int) -> str:
    """`value` if it is a string that both databases store unchanged, else ValueError.

    Why here and not only in the service: PostgreSQL refuses NUL characters in text and
    strings longer than a VARCHAR(n) column (a DataError mid-transaction), while SQLite
    stores anything, however long. Checked before any SQL so both databases accept exactly
    the same strings and a caller of the gallery (service, bulk jobs) cannot grow rows
    without bound. The message never echoes the value.
    """
    if not isinstance(value, str) or not value.strip() or len(value) > max_length or "\x00" in value:
        raise ValueError(f"{what} must be a non-blank string of at most {max_length} characters without NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: not storable as UTF-8 text
        raise ValueError(f"{what} must be valid Unicode text") from None
    return value


#: Longest strings the columns hold (PostgreSQL enforces them; `check_text` does on both).
SUBJECT_NAME_MAX = Subject.__table__.c.name.type.length
#: Unicode categories refused in a subject name: control characters (newline, tab, NEL, ...)
#: and the line and paragraph separators. A name is a path segment and a log field: one
#: holding a newline enrolled, and then no route could address it.
_NAME_REFUSED = frozenset({"Cc", "Zl", "Zp"})


def canonical_name(value: object, what: str = "subject name") -> str:
    """The one form of a subject name that is stored and looked up: Unicode NFC, without
    leading or trailing white space. Names with control characters are refused (ValueError,
    the service's 422), as are those `check_text` refuses.

    Why: names that look the same must be the same subject. "é" typed as one code point and
    as "e" + combining accent were two subjects, so deleting one left the other; a padded
    name enrolled trimmed and then could not be found untrimmed. Every route (both APIs, the
    CLI, bulk migrations) passes names through here, and the gallery stores only names
    already in this form (`add_templates`, `add_subject` refuse others)."""
    text = check_text(value, what, SUBJECT_NAME_MAX)
    if any(unicodedata.category(c) in _NAME_REFUSED for c in text):
        raise ValueError(f"{what} must not contain control characters (newline, tab, ...)")
    name = unicodedata.normalize("NFC", text).strip()
    return check_text(name, what, SUBJECT_NAME_MAX)


def is_canonical_name(name: str) -> bool:
    try:
        return canonical_name(name) == name
    except ValueError:
        return False


def _repaired_name(name: str, subject_id: int) -> str:
    """The canonical form of a name stored before names had one: its control characters
    (refused since, but stored then) become spaces."""
    text = "".join(" " if unicodedata.category(c) in _NAME_REFUSED else c for c in name.replace("\x00", ""))
    try:
        return canonical_name(text[:SUBJECT_NAME_MAX])
    except ValueError:  # blank once repaired
        return f"subject {subject_id}"


def planned_renames(subjects: Sequence[tuple[int, int, str]]) -> list[dict[str, Any]]:
    """For the stored (subject id, collection id, name) of a gallery: the subjects whose
    names are not canonical, each with the name it is to take (`SubjectRename`). Where the
    canonical form is another subject's name already (or another rename's), the later
    subject takes "<canonical> (subject <id>)" instead: two people are never merged."""
    taken = {(cid, name) for _, cid, name in subjects if is_canonical_name(name)}
    out = []
    for sid, cid, name in subjects:
        if is_canonical_name(name):
            continue
        new = _repaired_name(name, sid)
        collision = (cid, new) in taken
        n = 0
        while (cid, new) in taken:
            n += 1
            suffix = f" (subject {sid})" if n == 1 else f" (subject {sid}, {n})"
            new = canonical_name(_repaired_name(name, sid)[: SUBJECT_NAME_MAX - len(suffix)] + suffix)
        taken.add((cid, new))
        out.append({"subject_id": sid, "collection_id": cid, "old_name": name, "new_name": new, "collision": collision})
    return out


def _check_canonical(name: object) -> None:
    if canonical_name(name, "subject names") != name:
        raise ValueError("subject names must be in canonical form (NFC, trimmed): pass them through canonical_name")
EXTRACTOR_NAME_MAX = Template.__table__.c.extractor_name.type.length
EXTRACTOR_VERSION_MAX = Template.__table__.c.extractor_version.type.length


def _stored_name(name: str, collection: str) -> str:
    """A name looked up: one that could never have been stored is absent (and PostgreSQL
    would refuse it in a query), without asking the database."""
    try:
        return check_text(name, "subject name", SUBJECT_NAME_MAX)
    except ValueError:
        raise SubjectNotFound(f"no such subject in collection {collection!r}") from None


def _check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"config_digest must be 16 lowercase hex digits, got {digest!r}")
    return digest


def _template_count() -> ScalarSelect[int]:
    """Correlated count of a subject's templates (a JSON column cannot be grouped by on PG)."""
    return (
        select(func.count(Template.id)).where(Template.subject_id == Subject.id).scalar_subquery()
    )


class TemplateRepository(ChangeLog, GalleryKeys):
    """Templates and subjects: writes (each logged in its own transaction through the
    `ChangeLog` it extends), reads by id and in id order, counts and provenance; vectors
    sealed and opened with the keys of `GalleryKeys`."""

    # -- vectors: the one place they are encoded and decoded --------------------------------------
    def _encode(
        self, sealer: Sealer | None, cid: int, ids: Sequence[int], subjects: Sequence[tuple[str, _Sealed]],
        vectors: np.ndarray, *, scheme: Sequence[str], scheme_version: Sequence[int],
        config_digest: Sequence[str], key_id: Sequence[str | None],
    ) -> list[bytes]:
        """Stored bytes of each row (see `_encode_rows`)."""
        packed = self._encode_rows(
            sealer, cid, ids, subjects, vectors, scheme=scheme, scheme_version=scheme_version,
            config_digest=config_digest, key_id=key_id,
        )
        return [r.tobytes() for r in packed]

    def _encode_rows(
        self, sealer: Sealer | None, cid: int, ids: Sequence[int], subjects: Sequence[tuple[str, _Sealed]],
        vectors: np.ndarray, *, scheme: Sequence[str], scheme_version: Sequence[int],
        config_digest: Sequence[str], key_id: Sequence[str | None],
    ) -> np.ndarray:
        """Stored bytes of the rows as ONE uint8 [n, width] array (every row of a write has one
        width; a bulk insert ships it as is): plaintext float32 in an unsealed gallery, else
        sealed under its subject's key and bound to the row's id and provenance. Ciphers of
        existing subjects are looked up together (cached only for small writes: a bulk
        migration must not fill the sealer's cache)."""
        if sealer is None:
            return np.ascontiguousarray(vectors, dtype="<f4").view(np.uint8)
        dim = vectors.shape[1]
        lookup = list({(cid, name, s.key) for name, s in subjects if s.cipher is None})
        by_item = sealer.subject_ciphers(lookup, cache=len(lookup) <= _IN_CHUNK) if lookup else {}  # type: ignore[arg-type]
        ciphers = [s.cipher if s.cipher is not None else by_item[cid, name, s.key] for name, s in subjects]  # type: ignore[index]
        ads = [
            template_ad(cid, t, s, v, d, k, dim)
            for t, s, v, d, k in zip(ids, scheme, scheme_version, config_digest, key_id, strict=True)
        ]
        return sealer.seal_vectors(ciphers, ads, vectors)

    def _decode(self, rows: Sequence) -> list[np.ndarray]:  # type: ignore[type-arg]
        """Vectors of rows carrying (id, collection_id, name, sealed_key, vector, dim, scheme,
        scheme_version, config_digest, key_id). A sealed row failing authentication raises
        `TamperedError` naming the template; a plaintext row in a gallery sealed to the end
        is refused the same way (someone wrote it around the gallery)."""
        out = []
        refuse_plain = self._seal.sealed and not self._seal.converting
        ciphers = self._row_ciphers(rows)
        for r in rows:
            # Positional unpacking: attribute access on rows cost more than the decryption.
            tid, cid, name, skey, blob, dim, scheme, version, digest, kid = r[:10]
            if len(blob) == 4 * dim:
                if refuse_plain:
                    raise TamperedError(f"template {tid} is stored unsealed in a sealed gallery (written around it?)")
                out.append(np.frombuffer(blob, dtype="<f4"))
                continue
            if len(blob) != sealed_size(dim):
                raise ValueError(f"stored template {tid} has {len(blob)} bytes, its row says dim={dim}")
            if skey is None:
                raise TamperedError(f"template {tid} is sealed but its subject has no key")
            ad = template_ad(cid, tid, scheme, version, digest, kid, dim)
            out.append(np.frombuffer(Sealer.open_vector(ciphers[cid, name, skey], ad, blob, tid), dtype="<f4"))
        return out

    def _row_ciphers(self, rows: Sequence) -> dict[tuple[int, str, bytes], Any]:  # type: ignore[type-arg]
        """The subject ciphers of the sealed rows among `rows`, all at once (one erasure-store
        query). Small reads (search candidates, catch-up) share the sealer's cache; bulk
        reads (an index rebuild) keep theirs for the call only."""
        items = {(r[1], r[2], r[3]) for r in rows if r[3] is not None and len(r[4]) != 4 * r[5]}
        if not items:
            return {}
        sealer = self._read_sealer()
        if any(Sealer.subject_key_serial(k) not in sealer.serials for _, _, k in items):
            sealer = self._read_sealer(refresh=True)  # re-keyed by another process
        return sealer.subject_ciphers(list(items), cache=len(rows) <= _IN_CHUNK)  # type: ignore[return-value]

    def _vector_columns(self) -> tuple:  # type: ignore[type-arg]
        """What `_decode` needs of a row (templates joined with subjects)."""
        return (
            Template.id, Template.collection_id, Subject.name, Subject.sealed_key, Template.vector,
            Template.dim, Template.scheme, Template.scheme_version, Template.config_digest,
            Template.key_id,
        )

    # -- writing ---------------------------------------------------------------------------
    def add_templates(
        self,
        subjects: Sequence[str],
        templates: np.ndarray,
        *,
        protection: ProtectorMetadata,
        extractor_name: str,
        extractor_version: str,
        collection: str = DEFAULT_COLLECTION,
        image_sha256: Sequence[str | None] | None = None,
        images: Sequence[bytes | None] | None = None,
    ) -> list[int]:
        """Store templates[i] for subjects[i] (subjects created as needed), all in ONE
        transaction; returns the new template ids in input order.

        `protection` is the protector's metadata (scheme, version, config digest, key id,
        output dim) and is written on every row, together with the extractor's name and
        version.
        """
        vectors = validate_embeddings(templates, protection.output_dim, what="templates")
        digest = _check_digest(protection.config_digest)
        if len(subjects) != len(vectors):
            raise ValueError(f"{len(subjects)} subject names for {len(vectors)} templates")
        for extra, what in ((image_sha256, "image_sha256"), (images, "images")):
            if extra is not None and len(extra) != len(vectors):
                raise ValueError(f"{what} has {len(extra)} entries for {len(vectors)} templates")
        for name in set(subjects):
            _check_canonical(name)
        check_text(extractor_name, "extractor_name", EXTRACTOR_NAME_MAX)
        check_text(extractor_version, "extractor_version", EXTRACTOR_VERSION_MAX)
        if not len(vectors):
            return []
        cid = self.collection_id(collection)
        now = utcnow()
        with self._write() as conn:
            sealer = self._write_sealer(conn)
            found = self._subject_ids(conn, cid, subjects, create=True, sealer=sealer)
            ids = self._next_template_ids(conn, len(vectors))
            n = len(ids)
            stored = self._encode_rows(
                sealer, cid, ids, [(name, found[name]) for name in subjects], vectors,
                scheme=[protection.scheme] * n, scheme_version=[protection.scheme_version] * n,
                config_digest=[digest] * n, key_id=[protection.key_id] * n,
            )
            columns = {
                "id": ids,
                "subject_id": [found[name].id for name in subjects],
                "image_sha256": list(image_sha256) if image_sha256 is not None else [None] * len(ids),
                "image": list(images) if images is not None else [None] * len(ids),
            }
            shared = {
                "collection_id": cid,
                "dim": protection.output_dim,
                "scheme": protection.scheme,
                "scheme_version": protection.scheme_version,
                "config_digest": digest,
                "key_id": protection.key_id,
                "extractor_name": extractor_name,
                "extractor_version": extractor_version,
                "created_at": now,
                "updated_at": now,
            }
            if self.dialect == "postgresql" and image_sha256 is None and images is None:
                # Sealed or not, every row of the chunk has the same length: one binary COPY
                # whose rows numpy lays out (a bulk migration's path; no per-row Python).
                pg_copy(conn, "templates", [
                    ("id", np.asarray(ids, np.int64)),
                    ("subject_id", np.asarray(columns["subject_id"], np.int64)),
                    ("vector", stored),
                    ("collection_id", pg_int4(cid)),
                    ("dim", pg_int4(protection.output_dim)),
                    ("scheme", pg_text(protection.scheme)),
                    ("scheme_version", pg_int4(protection.scheme_version)),
                    ("config_digest", pg_text(digest)),
                    ("key_id", pg_text(protection.key_id)),
                    ("extractor_name", pg_text(extractor_name)),
                    ("extractor_version", pg_text(extractor_version)),
                    ("created_at", pg_timestamptz(now)),
                    ("updated_at", pg_timestamptz(now)),
                ])
            elif self.dialect == "postgresql":
                # Sealed or not, every row of the chunk has the same length: one bytea still.
                conn.execute(
                    _PG_INSERT_TEMPLATES,
                    columns | shared | {"vectors": stored.tobytes(), "nbytes": stored.shape[1]},
                )
            elif image_sha256 is None and images is None:
                # SQLite, a bulk write's path: ONE statement, the vectors as one blob cut by
                # SQLite and the subject ids as one JSON array; chunk-wide values bound once
                # (no per-row Python tuple, no per-row binding of a dozen parameters).
                table = Template.__table__
                params = {n: bound_value(table.c[n], conn.dialect, v) for n, v in shared.items()}
                conn.exec_driver_sql(_SQLITE_INSERT_TEMPLATES, params | {
                    "first": ids[0], "subject_ids": json.dumps(columns["subject_id"]),
                    "vectors": stored.tobytes(), "nbytes": stored.shape[1],
                })
            else:  # SQLite: the driver's executemany, one prepared statement
                # Plain tuples straight to sqlite3: SQLAlchemy's per-row parameter handling
                # (a dict per row, each DateTime formatted again) cost more than the insert.
                # The chunk-wide values go through their column types' bind processors
                # once, so what is stored is exactly what `insert(Template)` would store.
                columns["vector"] = [r.tobytes() for r in stored]
                table = Template.__table__
                names = [*columns, *shared]
                sql = f"INSERT INTO templates ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"  # noqa: S608 - fixed column names
                tail = tuple(bound_value(table.c[n], conn.dialect, v) for n, v in shared.items())
                conn.exec_driver_sql(sql, [r + tail for r in zip(*columns.values(), strict=True)])
            # One change-log statement for the chunk. The id range holds no one else's rows
            # (ids come from our allocation, under the write lock).
            self._log_inserted(conn, cid, ids[0], ids[-1], now)
        return ids

    def _next_template_ids(self, conn: Connection, n: int) -> list[int]:
        """Allocate `n` new template ids, ascending and contiguous. Allocating first and
        inserting with explicit ids lets a chunk go in as one bulk statement without
        RETURNING (whose per-row fallback on SQLite and client-side query parsing on psycopg
        dominated the insert time), and lets the change log and a migration's chunk record
        name the chunk as one id range. Ids are still never reused (see `_next_ids`)."""
        return self._next_ids(conn, "templates", n)

    def _next_ids(self, conn: Connection, table: str, n: int) -> list[int]:
        """`n` new contiguous ids of `table` (templates, subjects), in the caller's write
        transaction. PostgreSQL: one block of the column's sequence in one statement (every
        writer of these tables holds the write lock, so no other nextval lands inside it; a
        rolled-back block is skipped, never reused: sequences are not transactional). SQLite:
        inside the `BEGIN IMMEDIATE` write transaction, after both the largest id and
        AUTOINCREMENT's high-water mark."""
        if self.dialect == "postgresql":
            q = text(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"nextval(pg_get_serial_sequence('{table}', 'id')) + :n - 1)"
            )
            last = int(conn.scalar(q, {"n": n}))
            return list(range(last - n + 1, last + 1))
        last = conn.exec_driver_sql(
            f"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = '{table}'), 0), "  # noqa: S608
            f"coalesce((SELECT max(id) FROM {table}), 0))"
        ).scalar()
        return list(range(int(last) + 1, int(last) + 1 + n))

    def _subject_ids(
        self, conn: Connection, cid: int, names: Sequence[str], *, create: bool, sealer: Sealer | None = None
    ) -> dict[str, _Sealed]:
        """{name: (subject id, sealed subject key)}, creating missing subjects when `create`.
        With a sealer every subject has a key: new ones get theirs on insert, ones made
        before the gallery was sealed get one now."""
        wanted = sorted(set(names))
        found = self._find_subjects(conn, cid, wanted)
        missing = [n for n in wanted if n not in found]
        if missing and create:
            # Explicit ids (see _next_template_ids): one bulk insert, nothing read back.
            now = utcnow()
            made = dict(zip(missing, sealer.new_subject_keys(cid, missing), strict=True)) if sealer else {}
            keys = [made[n][0] if sealer else None for n in missing]
            sids = self._next_ids(conn, "subjects", len(missing))
            if self.dialect == "postgresql":
                pg_copy_rows(
                    conn, "subjects",
                    [("id", "int8"), ("collection_id", "int4"), ("name", "varchar"), ("sealed_key", "bytea"),
                     ("created_at", "timestamptz")],
                    ((i, cid, n, k, now) for i, n, k in zip(sids, missing, keys, strict=True)),
                )
            else:  # one statement, as the templates (see _SQLITE_INSERT_TEMPLATES)
                width = len(keys[0]) if keys[0] is not None else 0  # one sealer: one key length
                conn.exec_driver_sql(_SQLITE_INSERT_SUBJECTS, {
                    "first": sids[0], "cid": cid, "names": json.dumps(missing), "width": width,
                    "keys": b"".join(keys) if width else b"",  # type: ignore[arg-type]
                    "created_at": bound_value(Subject.__table__.c.created_at, conn.dialect, now),
                })
            found.update({
                n: _Sealed(i, k, made[n][1] if sealer else None)
                for i, n, k in zip(sids, missing, keys, strict=True)
            })
        if sealer is not None:
            unkeyed = [n for n, s in found.items() if s.key is None]
            keyless = dict(zip(unkeyed, sealer.new_subject_keys(cid, unkeyed), strict=True))
            if keyless:
                conn.execute(
                    update(Subject).where(Subject.id == bindparam("sid")).values(sealed_key=bindparam("k")),
                    [{"sid": found[n].id, "k": k} for n, (k, _) in keyless.items()],
                )
                found.update({n: _Sealed(found[n].id, k, c) for n, (k, c) in keyless.items()})
        return found

    def _find_subjects(self, conn: Connection, cid: int, names: Sequence[str]) -> dict[str, _Sealed]:
        if self.dialect == "postgresql":
            rows = conn.execute(_PG_FIND_SUBJECTS, {"cid": cid, "names": json.dumps(list(names))})
            return {n: _Sealed(int(i), k) for n, i, k in rows}
        found: dict[str, _Sealed] = {}
        for part in _chunks(names):
            # The driver's own query (a bulk write looks up thousands of names per chunk).
            q = f"SELECT name, id, sealed_key FROM subjects WHERE collection_id = ? AND name IN ({', '.join('?' * len(part))})"  # noqa: S608 - placeholders only
            found.update({n: _Sealed(int(i), k) for n, i, k in conn.exec_driver_sql(q, (cid, *part))})
        return found

    def replace_templates(
        self,
        ids: Sequence[int],
        templates: np.ndarray,
        *,
        key_id: str | None,
        scheme: str | None = None,
        scheme_version: int | None = None,
        config_digest: str | None = None,
        from_key_id: str | None = None,
    ) -> int:
        """Overwrite the vectors (and key id, optionally scheme/version/config digest) of
        existing templates in ONE transaction, logging each as a change for the index;
        returns the row count. A row keeps its scheme, version and config digest unless new
        ones are given (a key rotation changes the key only).

        For key rotation: with `from_key_id`, every row must still carry that key id, else
        nothing changes (so a rotation interrupted and restarted never double-rotates).
        Raises KeyError if an id does not exist (nothing changes).
        """
        ids = [int(i) for i in ids]
        t = np.asarray(templates)
        if t.ndim != 2 or len(t) != len(ids):
            raise ValueError(f"need one template row per id ({len(ids)}), got shape {list(t.shape)}")
        vectors = validate_embeddings(t, t.shape[1], what="templates")
        if config_digest is not None:
            _check_digest(config_digest)
        if not ids:
            return 0
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate template ids")
        now = utcnow()
        with self._write() as conn:
            sealer = self._write_sealer(conn)
            current: dict[int, Any] = {}
            for part in _chunks(ids):
                q = (
                    select(
                        Template.id, Template.collection_id, Template.dim, Template.key_id,
                        Template.scheme, Template.scheme_version, Template.config_digest, Subject.name,
                    )
                    .join(Subject, Subject.id == Template.subject_id)
                    .where(Template.id.in_(part))
                )
                current.update({int(r.id): r for r in conn.execute(q)})
            missing = [i for i in ids if i not in current]
            if missing:
                raise KeyError(f"{len(missing)} template ids do not exist (first: {missing[0]})")
            if any(r.dim != vectors.shape[1] for r in current.values()):
                raise ValueError("replacement templates must keep each row's dimension")
            if from_key_id is not None and any(r.key_id != from_key_id for r in current.values()):
                raise ValueError(f"some templates are not under key {from_key_id}; nothing replaced")
            stored = self._encode_replacements(
                conn, sealer, ids, current, vectors, key_id=key_id, scheme=scheme,
                scheme_version=scheme_version, config_digest=config_digest,
            )
            values: dict[str, object] = {
                "vector": bindparam("v"), "key_id": key_id, "updated_at": now,
            }
            if scheme is not None:
                values["scheme"] = scheme
            if scheme_version is not None:
                values["scheme_version"] = scheme_version
            if config_digest is not None:
                values["config_digest"] = config_digest
            stmt = update(Template).where(Template.id == bindparam("tid")).values(**values)
            conn.execute(
                stmt.execution_options(synchronize_session=False),
                [{"tid": i, "v": v} for i, v in zip(ids, stored, strict=True)],
            )
            by_collection: dict[int, list[int]] = {}
            for i in ids:
                by_collection.setdefault(current[i].collection_id, []).append(i)
            for cid, part in by_collection.items():
                self._log(conn, cid, part, "upsert", now)
        return len(ids)

    def _encode_replacements(
        self, conn: Connection, sealer: Sealer | None, ids: list[int], current: dict[int, Any],
        vectors: np.ndarray, *, key_id: str | None, scheme: str | None, scheme_version: int | None,
        config_digest: str | None,
    ) -> list[bytes]:
        """Stored bytes of replacement vectors, sealed under each row's NEW provenance."""
        if sealer is None:
            return [_to_bytes(v) for v in vectors]
        out: list[bytes] = [b""] * len(ids)
        by_collection: dict[int, list[int]] = {}
        for pos, i in enumerate(ids):
            by_collection.setdefault(current[i].collection_id, []).append(pos)
        for cid, positions in by_collection.items():
            rows = [current[ids[p]] for p in positions]
            keys = self._subject_ids(conn, cid, [r.name for r in rows], create=False, sealer=sealer)
            sealed = self._encode(
                sealer, cid, [ids[p] for p in positions], [(r.name, keys[r.name]) for r in rows],
                vectors[positions],
                scheme=[scheme if scheme is not None else r.scheme for r in rows],
                scheme_version=[scheme_version if scheme_version is not None else r.scheme_version for r in rows],
                config_digest=[config_digest if config_digest is not None else r.config_digest for r in rows],
                key_id=[key_id] * len(rows),
            )
            for p, b in zip(positions, sealed, strict=True):
                out[p] = b
        return out

    def seal_templates(self, *, chunk_size: int = 10_000) -> Iterator[int]:
        """Convert an unsealed gallery in place (`advplugin db seal`): create its data key,
        then seal the plaintext rows in id order, `chunk_size` per transaction (yields how
        many each time), and finally mark the gallery sealed, after which a plaintext row is
        refused. Resumable: a rerun seals only what is still plaintext. Sealing changes no
        vector's meaning, so nothing is logged for the index. Needs the master key."""
        if self._seal.provider is None:
            raise self._locked() if self._seal.sealed else MasterKeyError(
                f"sealing needs a master key: {MASTER_KEY_HINT}"
            )
        self.begin_sealing()
        last = 0
        while True:
            with self._write() as conn:
                sealer = self._write_sealer(conn)
                assert sealer is not None
                rows = conn.execute(
                    select(*self._vector_columns())
                    .join(Subject, Subject.id == Template.subject_id)
                    .where(Template.id > last, func.length(Template.vector) == 4 * Template.dim)
                    .order_by(Template.id)
                    .limit(chunk_size)
                ).all()
                if not rows:
                    self._finish_converting(conn)
                    self._refresh(conn)
                    return
                by_collection: dict[int, list[Any]] = {}
                for r in rows:
                    by_collection.setdefault(int(r.collection_id), []).append(r)
                params = []
                for cid, part in by_collection.items():
                    keys = self._subject_ids(conn, cid, [r.name for r in part], create=False, sealer=sealer)
                    sealed = self._encode(
                        sealer, cid, [int(r.id) for r in part], [(r.name, keys[r.name]) for r in part],
                        np.stack([np.frombuffer(r.vector, dtype="<f4") for r in part]),
                        scheme=[r.scheme for r in part], scheme_version=[r.scheme_version for r in part],
                        config_digest=[r.config_digest for r in part], key_id=[r.key_id for r in part],
                    )
                    params += [{"tid": int(r.id), "v": v} for r, v in zip(part, sealed, strict=True)]
                conn.execute(
                    update(Template).where(Template.id == bindparam("tid")).values(vector=bindparam("v"))
                    .execution_options(synchronize_session=False),
                    params,
                )
                last = int(rows[-1].id)
            yield len(rows)

    def make_subjects_erasable(self, *, chunk_size: int = 1000) -> Iterator[int]:
        """Give every subject sealed before the gallery had an erasure key store a NEW
        subject key with an erasure key, re-sealing its templates under it, `chunk_size`
        subjects per transaction (yields how many each time; resumable: a subject's key
        length says whether it is done). Part of `advplugin db seal`. A copy of the database
        made before still holds the old subject keys: `db rewrap --new-data-key` retires
        the data key that opens them. Nothing is logged for the index (no vector changes
        meaning)."""
        self._read_sealer(refresh=True).require_erasure("making subjects erasable")
        while True:
            with self._write() as conn:
                sealer = self._write_sealer(conn)
                assert sealer is not None
                subjects = conn.execute(
                    select(Subject.id, Subject.collection_id, Subject.name)
                    .where(func.length(Subject.sealed_key) == SUBJECT_KEY_BYTES)
                    .order_by(Subject.id).limit(chunk_size)
                ).all()
                if not subjects:
                    return
                rows = conn.execute(
                    select(*self._vector_columns())
                    .join(Subject, Subject.id == Template.subject_id)
                    .where(Template.subject_id.in_([r.id for r in subjects]))
                    .order_by(Template.id)
                ).all()
                vectors = self._decode(rows)  # under the old subject keys
                new_keys: dict[tuple[int, str], _Sealed] = {}
                for cid in {int(r.collection_id) for r in subjects}:
                    names = [r.name for r in subjects if r.collection_id == cid]
                    for n, (k, c) in zip(names, sealer.new_subject_keys(cid, names), strict=True):
                        new_keys[cid, n] = _Sealed(0, k, c)
                conn.execute(
                    update(Subject).where(Subject.id == bindparam("sid")).values(sealed_key=bindparam("k")),
                    [{"sid": r.id, "k": new_keys[int(r.collection_id), r.name].key} for r in subjects],
                )
                params = []
                for cid in {int(r.collection_id) for r in rows}:
                    part = [(r, v) for r, v in zip(rows, vectors, strict=True) if r.collection_id == cid]
                    sealed = self._encode(
                        sealer, cid, [int(r.id) for r, _ in part], [(r.name, new_keys[cid, r.name]) for r, _ in part],
                        np.stack([v for _, v in part]),
                        scheme=[r.scheme for r, _ in part], scheme_version=[r.scheme_version for r, _ in part],
                        config_digest=[r.config_digest for r, _ in part], key_id=[r.key_id for r, _ in part],
                    )
                    params += [{"tid": int(r.id), "v": b} for (r, _), b in zip(part, sealed, strict=True)]
                if params:
                    conn.execute(
                        update(Template).where(Template.id == bindparam("tid")).values(vector=bindparam("v"))
                        .execution_options(synchronize_session=False),
                        params,
                    )
            yield len(subjects)

    def count_unerasable(self) -> int:
        """Sealed subjects without an erasure key (sealed before the store existed)."""
        q = select(func.count()).select_from(Subject).where(func.length(Subject.sealed_key) == SUBJECT_KEY_BYTES)
        with self._read() as conn:
            return int(conn.scalar(q) or 0)

    def count_unsealed(self) -> int:
        """Templates still stored in plaintext (a full scan: for status and tests)."""
        q = select(func.count()).select_from(Template).where(func.length(Template.vector) == 4 * Template.dim)
        with self._read() as conn:
            return int(conn.scalar(q) or 0)

    def delete_templates(self, ids: Sequence[int]) -> int:
        """Delete templates by id (unknown ids are ignored); returns how many were deleted."""
        ids = [int(i) for i in ids]
        now = utcnow()
        deleted = 0
        with self._write() as conn:
            for part in _chunks(ids):
                rows = conn.execute(
                    select(Template.id, Template.collection_id).where(Template.id.in_(part))
                ).all()
                conn.execute(delete(Template).where(Template.id.in_([r.id for r in rows])))
                for r in rows:
                    self._log(conn, r.collection_id, [int(r.id)], "delete", now)
                deleted += len(rows)
        return deleted

    def add_subject(self, name: str, *, collection: str = DEFAULT_COLLECTION) -> bool:
        """Create a subject without templates (CompreFace's "add a subject"); False when it
        exists. No change-log row: an index holds templates, and this adds none."""
        _check_canonical(name)
        cid = self.collection_id(collection)
        with self._write() as conn:
            if self._find_subjects(conn, cid, [name]):
                return False
            self._subject_ids(conn, cid, [name], create=True, sealer=self._write_sealer(conn))
        return True

    def delete_subject(self, name: str, *, collection: str = DEFAULT_COLLECTION) -> int:
        """Delete a subject and every template of it; returns the number of templates.
        Raises `SubjectNotFound`."""
        name = _stored_name(name, collection)
        cid = self.collection_id(collection)
        now = utcnow()
        with self._write() as conn:
            row = conn.execute(
                select(Subject.id, Subject.sealed_key).where(Subject.collection_id == cid, Subject.name == name)
            ).one_or_none()
            if row is None:
                raise SubjectNotFound(f"no subject {name!r} in collection {collection!r}")
            ids = self._delete_subject_rows(conn, cid, row.id, now)
            if row.sealed_key is not None:
                # Its erasure key (outside the database) goes after the commit: see PendingErasure.
                conn.execute(insert(PendingErasure).values(
                    collection_id=cid, name=name, sealed_key=row.sealed_key, created_at=now,
                ))
        if self._conn is None:  # in a transaction() view its owner completes after the commit
            self.complete_erasures_or_warn()
        return len(ids)

    def _delete_subject_rows(self, conn: Connection, cid: int, sid: int, now: datetime) -> list[int]:
        """Delete one subject and its templates in `conn`, logged for the index."""
        ids = [int(i) for i in conn.scalars(select(Template.id).where(Template.subject_id == sid))]
        conn.execute(delete(Template).where(Template.subject_id == sid))
        conn.execute(delete(Subject).where(Subject.id == sid))
        self._log(conn, cid, ids, "delete", now)
        return ids

    def complete_erasures_or_warn(self) -> None:
        """`complete_erasures` after a delete that has committed: a store that fails now
        leaves the outbox for the next delete or start-up, and says so in the log."""
        try:
            self.complete_erasures()
        except (SQLAlchemyError, OSError) as e:
            log.warning("erasure keys of deleted subjects not shredded yet (%s); retried at the next delete "
                        "or start-up", type(e).__name__)

    def purge_erased(self, *, chunk_size: int = 10_000) -> list[tuple[int, str]]:
        """Delete the subjects whose erasure keys are gone from the store: what a gallery
        restored from a backup holds of people deleted since (unreadable, but still rows).
        Returns their (collection id, name)."""
        sealer = self._read_sealer(refresh=True)
        store = sealer.require_erasure("purging erased subjects")
        gone = []
        last = 0
        while True:
            with self._read() as conn:
                rows = conn.execute(
                    select(Subject.id, Subject.collection_id, Subject.name, Subject.sealed_key)
                    .where(Subject.id > last, func.length(Subject.sealed_key) == ERASABLE_SUBJECT_KEY_BYTES)
                    .order_by(Subject.id).limit(chunk_size)
                ).all()
            if not rows:
                break
            refs = {r.id: sealer.erasure_ref_of(r.collection_id, r.name, r.sealed_key) for r in rows}
            present = store.get(refs.values())
            gone += [r for r in rows if refs[r.id] not in present]
            last = int(rows[-1].id)
        now = utcnow()
        with self._write() as conn:
            for r in gone:
                self._delete_subject_rows(conn, int(r.collection_id), int(r.id), now)
        return [(int(r.collection_id), r.name) for r in gone]

    def complete_erasures(self) -> int:
        """Shred the erasure keys of deleted subjects (the `pending_erasures` outbox) and
        forget their cached ciphers; returns how many subjects were completed. Runs after
        every delete and at unlock; a no-op while the gallery is locked (the outbox waits)."""
        h = self._seal
        if h.sealer is None:
            return 0
        with self._read() as conn:
            rows = conn.execute(
                select(PendingErasure.id, PendingErasure.collection_id, PendingErasure.name, PendingErasure.sealed_key)
                .order_by(PendingErasure.id).limit(10_000)
            ).all()
        if not rows:
            return 0
        sealer = self._read_sealer(refresh=True)
        refs = []
        for r in rows:
            try:
                ref = sealer.erasure_ref_of(r.collection_id, r.name, r.sealed_key)
            except TamperedError:  # under a data key re-keyed away: unreadable already
                ref = None
            if ref is not None:
                refs.append(ref)
            sealer.forget_subject(r.collection_id, r.name, r.sealed_key)
        if refs:
            sealer.require_erasure(f"shredding the erasure keys of deleted subjects ({len(refs)})").shred(refs)
        with self._write() as conn:
            conn.execute(delete(PendingErasure).where(PendingErasure.id.in_([r.id for r in rows])))
        return len(rows)

    def pending_erasures(self) -> int:
        with self._read() as conn:
            return int(conn.scalar(select(func.count()).select_from(PendingErasure)) or 0)

    # -- reading -----------------------------------------------------------------------------
    def iter_templates(
        self,
        *,
        collection: str | None = DEFAULT_COLLECTION,
        chunk_size: int = 1000,
        after_id: int = 0,
        key_id: str | None = None,
        scheme: str | None = None,
    ) -> Iterator[TemplateBatch]:
        """Templates in ascending id order, `chunk_size` at a time (keyset pagination, so it
        is safe on millions of rows and resumable from `after_id`). `collection=None` means
        all collections. All rows of one chunk must share one dimension (filter by scheme or
        key id in mixed galleries)."""
        cid = None if collection is None else self.collection_id(collection, create=False)
        last = after_id
        while True:
            q = (
                select(*self._vector_columns(), Template.extractor_name, Template.extractor_version)
                .join(Subject, Subject.id == Template.subject_id)
                .where(Template.id > last)
                .order_by(Template.id)
                .limit(chunk_size)
            )
            if cid is not None:
                q = q.where(Template.collection_id == cid)
            if key_id is not None:
                q = q.where(Template.key_id == key_id)
            if scheme is not None:
                q = q.where(Template.scheme == scheme)
            with self._read() as conn:
                rows = conn.execute(q).all()
            if not rows:
                return
            dims = {r.dim for r in rows}
            if len(dims) > 1:
                raise ValueError(f"templates of several dimensions {sorted(dims)}; filter by scheme or key id")
            yield TemplateBatch(
                ids=np.array([r.id for r in rows], np.int64),
                subjects=[r.name for r in rows],
                vectors=np.stack(self._decode(rows)).astype(np.float32),
                scheme=[r.scheme for r in rows],
                scheme_version=[r.scheme_version for r in rows],
                key_id=[r.key_id for r in rows],
                extractor_name=[r.extractor_name for r in rows],
                extractor_version=[r.extractor_version for r in rows],
                config_digest=[r.config_digest for r in rows],
            )
            last = int(rows[-1].id)

    def get_templates(self, ids: Sequence[int]) -> dict[int, tuple[str, np.ndarray]]:
        """{template id: (subject name, protected vector)} for the ids that still exist."""
        return {i: (r.subject, r.vector) for i, r in self.template_rows(ids).items()}

    def template_rows(self, ids: Sequence[int]) -> dict[int, StoredTemplate]:
        """{template id: (subject, key id, vector)} for the ids that still exist, read in one
        snapshot: a vector is always paired with the key id it is under (mid-rotation, a
        vector from one read and a key id from another could disagree)."""
        out: dict[int, StoredTemplate] = {}
        with self._read() as conn:
            for part in _chunks([int(i) for i in ids]):
                q = (
                    select(*self._vector_columns())
                    .join(Subject, Subject.id == Template.subject_id)
                    .where(Template.id.in_(part))
                )
                rows = conn.execute(q).all()
                for r, v in zip(rows, self._decode(rows), strict=True):
                    out[int(r.id)] = StoredTemplate(r.name, r.key_id, v)
        return out

    def template_subjects(self, ids: Sequence[int]) -> dict[int, str]:
        """{template id: subject name}, for turning search hits into answers."""
        out: dict[int, str] = {}
        with self._read() as conn:
            for part in _chunks([int(i) for i in ids]):
                q = select(Template.id, Subject.name).join(Subject).where(Template.id.in_(part))
                out.update({int(i): n for i, n in conn.execute(q)})
        return out

    # -- counting and listing ---------------------------------------------------------------
    def count_templates(
        self,
        *,
        collection: str | None = DEFAULT_COLLECTION,
        key_id: str | None = None,
        scheme: str | None = None,
    ) -> int:
        q = select(func.count()).select_from(Template)
        if collection is not None:
            q = q.where(Template.collection_id == self.collection_id(collection))
        if key_id is not None:
            q = q.where(Template.key_id == key_id)
        if scheme is not None:
            q = q.where(Template.scheme == scheme)
        with self._read() as conn:
            return int(conn.scalar(q) or 0)

    def count_subjects(self, *, collection: str = DEFAULT_COLLECTION) -> int:
        q = select(func.count()).select_from(Subject).where(
            Subject.collection_id == self.collection_id(collection)
        )
        with self._read() as conn:
            return int(conn.scalar(q) or 0)

    def provenance(self, *, collection: str | None = DEFAULT_COLLECTION) -> list[dict[str, object]]:
        """Distinct (scheme, version, config digest, key id, extractor, dim) groups with their
        counts: shows mixed galleries (half-rotated keys, two extractors, two configurations
        of one scheme) at a glance."""
        cols = (
            Template.scheme, Template.scheme_version, Template.config_digest, Template.key_id,
            Template.extractor_name, Template.extractor_version, Template.dim,
        )
        q = select(*cols, func.count()).group_by(*cols)
        if collection is not None:
            q = q.where(Template.collection_id == self.collection_id(collection))
        with self._read() as conn:
            return [
                {
                    "scheme": r[0], "scheme_version": r[1], "config_digest": r[2], "key_id": r[3],
                    "extractor_name": r[4], "extractor_version": r[5], "dim": r[6], "count": r[7],
                }
                for r in conn.execute(q)
            ]

    def has_templates(self, *, key_id: str | None, collection: str | None = DEFAULT_COLLECTION) -> bool:
        """Whether any template is under `key_id` (an indexed probe, unlike counting): how a
        service notices that a key rotation has finished."""
        cond = Template.key_id.is_(None) if key_id is None else Template.key_id == key_id
        q = select(Template.id).where(cond).limit(1)
        if collection is not None:
            q = q.where(Template.collection_id == self.collection_id(collection))
        with self._read() as conn:
            return conn.scalar(q) is not None

    def list_subjects(
        self, *, collection: str = DEFAULT_COLLECTION, offset: int = 0, limit: int = 100
    ) -> list[SubjectInfo]:
        cid = self.collection_id(collection)
        q = (
            select(Subject.name, Subject.created_at, Subject.info, _template_count())
            .where(Subject.collection_id == cid)
            .order_by(Subject.name)
            .offset(offset)
            .limit(limit)
        )
        with self._read() as conn:
            return [SubjectInfo(r[0], int(r[3]), r[1], r[2]) for r in conn.execute(q)]

    def subject_renames(self) -> list[Any]:
        """The renames to canonical names the upgrade to revision 0011 planned, not yet done,
        in subject id order: rows with `SubjectRename`'s columns."""
        t = SubjectRename.__table__
        with self._read() as conn:
            return list(conn.execute(select(t).order_by(t.c.subject_id)).all())

    def forget_subject_rename(self, subject_id: int) -> None:
        with self._write() as conn:
            conn.execute(delete(SubjectRename).where(SubjectRename.subject_id == subject_id))

    def get_subject(self, name: str, *, collection: str = DEFAULT_COLLECTION) -> SubjectInfo:
        name = _stored_name(name, collection)
        cid = self.collection_id(collection)
        q = select(Subject.name, Subject.created_at, Subject.info, _template_count()).where(
            Subject.collection_id == cid, Subject.name == name
        )
        with self._read() as conn:
            r = conn.execute(q).first()
        if r is None:
            raise SubjectNotFound(f"no subject {name!r} in collection {collection!r}")
        return SubjectInfo(r[0], int(r[3]), r[1], r[2])

    def subject_template_ids(self, name: str, *, collection: str = DEFAULT_COLLECTION) -> list[int]:
        name = _stored_name(name, collection)
        cid = self.collection_id(collection)
        q = (
            select(Template.id)
            .join(Subject)
            .where(Subject.collection_id == cid, Subject.name == name)
            .order_by(Template.id)
        )
        with self._read() as conn:
            return [int(i) for i in conn.scalars(q)]
