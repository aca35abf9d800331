"""Migration presets for the schemas teams already run: CompreFace's PostgreSQL database and
deepface's PostgreSQL tables (docs/compreface.md).

Each preset is a `SqlTableSource` over a SELECT instead of one table (the SELECT joins
CompreFace's `embedding` to `subject`, or derives deepface's subject from `img_name`), so
keyset paging, decoding, validation, the resumable pipeline and `--verify` are the existing
ones; what a preset adds is which rows make one collection, which model made them, and how
to purge: both schemas declare the vector column NOT NULL, so purging deletes the migrated
rows (with what else holds biometric data of them: CompreFace's stored images, deepface's
face crops and serialized search index) instead of setting the column to NULL.

Schemas, as their projects publish them:
- CompreFace (Liquibase changelogs `db.changelog-0.0.4.yaml`, `-0.1.7.yaml`): `model(id,
  name, guid, app_id, api_key, type)`, `subject(id uuid, api_key, subject_name)`,
  `embedding(id uuid, subject_id -> subject, embedding float8[] NOT NULL, calculator NOT
  NULL, img_id -> img)`, `img(id uuid, content bytea)`. A recognition service is an API key;
  its subjects and their embeddings become one advplugin collection.
- deepface (`deepface/modules/database/postgres.py`): `embeddings(id bigserial, img_name,
  face, face_shape, model_name, detector_backend, aligned, l2_normalized, embedding
  float8[] NOT NULL, ...)`, plus `embeddings_index(... index_data bytea)`; with pgvector
  (`pgvector.py`) one table per model, `embedding vector(D)`, which reads as JSON text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from advplugin.bulk.sources import SqlTableSource, VectorFormat
from advplugin.gallery import Gallery
from advplugin.gallery.apikeys import hash_api_key

#: Scope of the advplugin API key made from a CompreFace key: its clients add and delete.
COMPREFACE_KEY_SCOPE = "enrol"


class QuerySource(SqlTableSource):
    """A `SqlTableSource` whose rows come from a SELECT with columns `id`, `subject` and
    `vector` (the id unique and ordered): paged by `id` like a table (PostgreSQL pushes the
    `id > cursor` bound into the SELECT, so pages are index seeks). Purging is the preset's."""

    def __init__(
        self, engine: sa.Engine, query: sa.Select[Any], *, name: str, vector_format: VectorFormat = "auto"
    ) -> None:
        self._sa = sa
        self.engine = engine
        self.table = query.subquery("source")  # type: ignore[assignment]
        self.id_col = self.table.c.id
        self.subject_col = self.table.c.subject
        self.vector_col = self.table.c.vector
        self.vector_format = vector_format
        self.name = name

    def purge(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """The engine is the preset's (shared by its sources): `close_presets` disposes it."""


def _reflect(engine: sa.Engine, *names: str) -> dict[str, sa.Table]:
    meta = sa.MetaData()
    insp = sa.inspect(engine)
    out = {}
    for n in names:
        if insp.has_table(n):
            out[n] = sa.Table(n, meta, autoload_with=engine)
    return out


def _safe_url(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _vacuum_note(tables: str) -> str:
    return (f"; old row versions stay on disk until `VACUUM FULL {tables}` "
            "(it locks the tables, so run it when convenient)")


# -- CompreFace ------------------------------------------------------------------------------------
@dataclass
class ServiceInfo:
    """One CompreFace recognition service (an API key): what becomes one collection."""

    api_key: str
    model_name: str | None
    subjects: int
    embeddings: int
    calculators: list[str]


class CompreFaceSource(QuerySource):
    """The embeddings of one CompreFace recognition service (API key), with subject names."""

    def __init__(self, engine: sa.Engine, tables: dict[str, sa.Table], info: ServiceInfo) -> None:
        emb, subj = tables["embedding"], tables["subject"]
        if len(info.calculators) > 1:
            raise ValueError(
                f"CompreFace service {info.model_name or 'API key sha256 ' + hash_api_key(info.api_key)[:12]} has "
                f"embeddings of several models {info.calculators}: they cannot be compared with each "
                "other; re-compute them with one model in CompreFace first"
            )
        query = (
            sa.select(
                # as text: the cursor of a resumed job is stored as JSON
                sa.type_coerce(emb.c.id, sa.Uuid(as_uuid=False)).label("id"),
                subj.c.subject_name.label("subject"),
                emb.c.embedding.label("vector"),
            )
            .join(subj, subj.c.id == emb.c.subject_id)
            .where(subj.c.api_key == info.api_key)
        )
        super().__init__(engine, query, name=f"compreface:{_safe_url(engine)}#{info.api_key}", vector_format="array")
        self.tables = tables
        self.info = info

    def describe(self) -> str:
        # The API key is a credential: named by a fingerprint of its hash, never by its text.
        who = self.info.model_name or "service"
        return f"compreface:{_safe_url(self.engine)} {who} (API key sha256 {self.fingerprint})"

    @property
    def fingerprint(self) -> str:
        return hash_api_key(self.info.api_key)[:12]

    @property
    def calculator(self) -> str | None:
        return self.info.calculators[0] if self.info.calculators else None

    def grant_api_key(self, gallery: Gallery, collection: str) -> bool:
        """Make the service's CompreFace API key an advplugin key of `collection` (scope
        `enrol`), so clients keep their key when pointed at advplugin; False if it already is."""
        digest = hash_api_key(self.info.api_key)
        if any(h == digest for h, _ in gallery.api_key_hashes()):
            return False
        gallery.create_api_key_hash(digest, "compreface", collection=collection, scope=COMPREFACE_KEY_SCOPE)
        return True

    def purge(self) -> str:
        """Delete the service's embedding rows and the images they point to (CompreFace keeps
        uploaded images in `img`): both are biometric. Subjects (names) stay."""
        emb, subj = self.tables["embedding"], self.tables["subject"]
        mine = sa.select(subj.c.id).where(subj.c.api_key == self.info.api_key)
        with self.engine.begin() as conn:
            deleted = conn.execute(
                sa.delete(emb).where(emb.c.subject_id.in_(mine)).returning(emb.c.img_id)
            ).all()
            img_ids = [r[0] for r in deleted if r[0] is not None]
            images = 0
            if "img" in self.tables:
                img = self.tables["img"]
                for s in range(0, len(img_ids), 10_000):
                    images += conn.execute(sa.delete(img).where(img.c.id.in_(img_ids[s : s + 10_000]))).rowcount
        return (f"deleted {len(deleted)} embedding rows and {images} stored images of {self.describe()}"
                f"{_vacuum_note('embedding, img')}")


def compreface_services(url: str) -> tuple[sa.Engine, list[CompreFaceSource]]:
    """Every CompreFace recognition service in the database at `url` that holds embeddings."""
    engine = sa.create_engine(url)
    tables = _reflect(engine, "embedding", "subject", "img", "model")
    missing = [t for t in ("embedding", "subject") if t not in tables]
    if missing:
        engine.dispose()
        raise ValueError(f"{_safe_url(engine)} is not a CompreFace database: no table(s) {missing}")
    emb, subj = tables["embedding"], tables["subject"]
    q = (
        sa.select(subj.c.api_key, sa.func.count(sa.distinct(subj.c.id)), sa.func.count(emb.c.id),
                  sa.func.array_agg(sa.distinct(emb.c.calculator)))
        .join(emb, emb.c.subject_id == subj.c.id)
        .group_by(subj.c.api_key)
        .order_by(subj.c.api_key)
    )
    names: dict[str, str] = {}
    with engine.connect() as conn:
        rows = conn.execute(q).all()
        if "model" in tables:
            model = tables["model"]
            names = {k: n for k, n in conn.execute(sa.select(model.c.api_key, model.c.name))}
    sources = [
        CompreFaceSource(engine, tables, ServiceInfo(k, names.get(k), int(s), int(e), sorted(c)))
        for k, s, e, c in rows
    ]
    return engine, sources


def compreface_collections(sources: list[CompreFaceSource], collection: str | None) -> list[str]:
    """One collection per service: `collection` when there is one service and it was given,
    else the CompreFace service's (model's) name, made unique with its key's fingerprint."""
    if collection is not None:
        if len(sources) > 1:
            raise ValueError(
                f"the CompreFace database holds {len(sources)} recognition services; each becomes its "
                "own collection (named after the service), so --collection cannot name them all"
            )
        return [collection]
    out: list[str] = []
    for s in sources:
        name = s.info.model_name or f"compreface-{s.fingerprint}"
        if name in out:
            name = f"{name}-{s.fingerprint}"
        out.append(name)
    return out


# -- deepface --------------------------------------------------------------------------------------
def _deepface_subject(img_name: sa.ColumnElement[str]) -> sa.ColumnElement[str]:
    """The identity of an `img_name` as deepface databases name images: the folder holding
    the image (`db/alice/1.jpg` -> `alice`, the layout `DeepFace.find` reads), or the file
    name without extension for a bare name (`alice.jpg` -> `alice`)."""
    path = sa.func.replace(img_name, "\\", "/")
    return sa.case(
        (sa.func.strpos(path, "/") > 0, sa.func.regexp_replace(path, r"^(.*/)?([^/]+)/[^/]*$", r"\2")),
        else_=sa.func.regexp_replace(path, r"\.[^./]*$", ""),
    )


class DeepFaceSource(QuerySource):
    """deepface's PostgreSQL embeddings (`embeddings`, float8[]; or a pgvector table,
    `vector(D)`, read as its JSON-like text), optionally of one `model_name` only."""

    def __init__(self, url: str, *, table: str | None = None, model_name: str | None = None) -> None:
        engine = sa.create_engine(url)
        insp = sa.inspect(engine)
        if table is None:
            candidates = [t for t in insp.get_table_names()
                          if t == "embeddings" or (t.startswith("embeddings_") and t != "embeddings_index")]
            if len(candidates) != 1:
                engine.dispose()
                raise ValueError(
                    f"{_safe_url(engine)}: give --deepface-table, deepface tables found: {candidates or 'none'}"
                )
            table = candidates[0]
        tables = _reflect(engine, table, "embeddings_index")
        if table not in tables:
            engine.dispose()
            raise ValueError(f"{_safe_url(engine)} has no table {table!r}")
        t = tables[table]
        missing = [c for c in ("id", "img_name", "embedding", "model_name") if c not in t.c]
        if missing:
            engine.dispose()
            raise ValueError(f"table {table!r} is not a deepface embeddings table: no column(s) {missing}")
        query = sa.select(t.c.id.label("id"), _deepface_subject(t.c.img_name).label("subject"),
                          t.c.embedding.label("vector"))
        if model_name is not None:
            query = query.where(t.c.model_name == model_name)
        distinct_models = sa.select(t.c.model_name).distinct()
        if model_name is not None:
            distinct_models = distinct_models.where(t.c.model_name == model_name)
        with engine.connect() as conn:
            models = sorted(conn.scalars(distinct_models))
        if len(models) > 1:
            engine.dispose()
            raise ValueError(
                f"table {table!r} holds embeddings of several models {models}: they cannot be compared "
                "with each other; pick one with --deepface-model"
            )
        # pgvector's `vector` has no SQLAlchemy type here: it arrives as text "[x, ...]".
        fmt: VectorFormat = "array" if isinstance(t.c.embedding.type, sa.ARRAY) else "json"
        suffix = f"?model={model_name}" if model_name else ""
        super().__init__(engine, query, name=f"deepface:{_safe_url(engine)}#{table}{suffix}", vector_format=fmt)
        self.t = t
        self.index_table = tables.get("embeddings_index")
        self.model_name = models[0] if models else model_name

    def close(self) -> None:
        self.engine.dispose()

    def purge(self) -> str:
        """Delete the migrated rows (vector, face crop and all) and deepface's serialized
        search index of that model, which holds the same vectors."""
        t = self.t
        where = [] if self.model_name is None else [t.c.model_name == self.model_name]
        with self.engine.begin() as conn:
            n = conn.execute(sa.delete(t).where(*where)).rowcount
            idx = 0
            if self.index_table is not None and "model_name" in self.index_table.c:
                it = self.index_table
                idx = conn.execute(sa.delete(it).where(
                    *([] if self.model_name is None else [it.c.model_name == self.model_name])
                )).rowcount
        extra = f" and {idx} rows of embeddings_index" if self.index_table is not None else ""
        return f"deleted {n} rows of {t.name}{extra} ({self.name}){_vacuum_note(t.name)}"
