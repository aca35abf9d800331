"""Alembic revisions of the gallery on a real SQLite file and a real PostgreSQL database:
the models' metadata equals the migrated schema, revision 0004 backfills
`templates.config_digest` (and refuses what it does not know) without losing anything, and
a batch migration started before 0009 resumes and verifies after it."""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, delete, insert, inspect, select, text

from advplugin.bulk import migrate, open_source, verify_migration
from advplugin.bulk.models import MigrationChunk, MigrationItem
from advplugin.bulk.pipeline import unpack_source_ids
from advplugin.bulk.sources import Chunk, Cursor, Source
from advplugin.bulk.verify import job_items
from advplugin.gallery import Gallery, make_engine
from advplugin.gallery.erasure import ErasureKeyStore
from advplugin.gallery.master_keys import LocalKeyProvider
from advplugin.gallery.models import Base
from advplugin.gallery.schema import (
    MIGRATIONS_DIR,
    alembic_config,
    current_revision,
    head_revision,
    upgrade,
)
from advplugin.protectors import create_protector, scheme_info
from tests.bulk.conftest import fill_table

BEFORE = "0003_templates_inline_vectors"
REVISION = "0004_templates_config_digest"
NOW = datetime(2026, 1, 2, tzinfo=UTC)


def _revision_0004() -> ModuleType:
    path = MIGRATIONS_DIR / "versions" / f"{REVISION}.py"
    spec = importlib.util.spec_from_file_location("_advplugin_revision_0004", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frozen_backfill_digests_are_the_default_configurations() -> None:
    backfill = _revision_0004().BACKFILL
    assert set(backfill) == {("xnn", 1), ("advface", 1), ("none", 1)}
    for (scheme, version), digest in backfill.items():
        info = scheme_info(scheme)
        assert info.version == version
        assert digest == info.config_digest(128), scheme
    # Dimension independent where the scheme works at any dimension.
    for scheme in ("xnn", "none"):
        assert scheme_info(scheme).config_digest(512) == backfill[scheme, 1]


def _diff(engine: Engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )


def test_models_equal_the_migrated_schema(gallery_url: str) -> None:
    engine = make_engine(gallery_url)
    try:
        upgrade(engine)
        assert _diff(engine) == []
        cols = {c["name"]: c for c in inspect(engine).get_columns("templates")}
        assert not cols["config_digest"]["nullable"] and cols["config_digest"]["default"] is None
    finally:
        engine.dispose()


def _rows_at_0003(engine: Engine, schemes: list[tuple[str, int]]) -> list[int]:
    """A collection, a subject, one template per (scheme, version) plus one deleted (the
    largest id), and a migration job whose items reference the templates."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO collections (name, created_at) VALUES ('default', :t)"), {"t": NOW})
        cid = conn.scalar(text("SELECT id FROM collections"))
        conn.execute(
            text("INSERT INTO subjects (collection_id, name, created_at) VALUES (:c, 'ann', :t)"),
            {"c": cid, "t": NOW},
        )
        sid = conn.scalar(text("SELECT id FROM subjects"))
        for scheme, version in [*schemes, ("xnn", 1)]:
            conn.execute(
                text(
                    "INSERT INTO templates (subject_id, collection_id, vector, dim, scheme, "
                    "scheme_version, key_id, extractor_name, extractor_version, created_at, "
                    "updated_at) VALUES (:s, :c, :v, 2, :scheme, :ver, NULL, 'dlib', 'v1', :t, :t)"
                ),
                {"s": sid, "c": cid, "v": np.ones(2, "<f4").tobytes(), "scheme": scheme,
                 "ver": version, "t": NOW},
            )
        ids = [int(i) for i in conn.scalars(text("SELECT id FROM templates ORDER BY id"))]
        conn.execute(text("DELETE FROM templates WHERE id = :i"), {"i": ids[-1]})
        conn.execute(
            text(
                "INSERT INTO migration_jobs (name, source, collection_id, scheme, chunks, rows, "
                "state, created_at, updated_at) VALUES ('job', 'src', :c, 'xnn', 1, 3, 'done', :t, :t)"
            ),
            {"c": cid, "t": NOW},
        )
        job = conn.scalar(text("SELECT id FROM migration_jobs"))
        for i in ids[:-1]:
            conn.execute(
                text("INSERT INTO migration_items (job_id, source_id, template_id) VALUES (:j, :s, :i)"),
                {"j": job, "s": f"src-{i}", "i": i},
            )
    return ids


def test_0004_backfills_config_digests_and_keeps_everything_else(gallery_url: str, key) -> None:
    backfill = _revision_0004().BACKFILL
    engine = make_engine(gallery_url)
    try:
        upgrade(engine, BEFORE)
        ids = _rows_at_0003(engine, [("xnn", 1), ("advface", 1), ("none", 1)])
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            got = conn.execute(text("SELECT id, scheme, config_digest FROM templates ORDER BY id")).all()
            items = conn.scalar(text("SELECT count(*) FROM migration_items"))
        assert [(i, s, d) for i, s, d in got] == [
            (ids[0], "xnn", backfill["xnn", 1]),
            (ids[1], "advface", backfill["advface", 1]),
            (ids[2], "none", backfill["none", 1]),
        ]
        assert items == 3  # the SQLite rebuild of `templates` cascaded nothing
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                ddl = conn.scalar(text("SELECT sql FROM sqlite_master WHERE name = 'templates'"))
            assert "AUTOINCREMENT" in ddl
        assert _diff(engine) == []

        # The way back and forth again, then the gallery writes and allocates as before.
        upgrade_downgrade_upgrade(engine)
        assert _diff(engine) == []
        with Gallery.open(gallery_url) as g:
            p = create_protector("xnn", key=key, dim=128)
            t = p.protect(np.random.default_rng(0).normal(size=(1, 128)).astype(np.float32))
            [new] = g.add_templates(["bob"], t, protection=p.metadata, extractor_name="d", extractor_version="1")
            assert new > ids[-1]  # the deleted template's id is never handed out again
            assert g.count_templates() == 4
    finally:
        engine.dispose()


def upgrade_downgrade_upgrade(engine: Engine) -> None:
    cfg = alembic_config()
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        with conn.begin():
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, BEFORE)
            assert "config_digest" not in {c["name"] for c in inspect(conn).get_columns("templates")}
            assert conn.scalar(text("SELECT count(*) FROM migration_items")) == 3
        if engine.dialect.name == "sqlite":
            conn.connection.driver_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]
    upgrade(engine)


def test_0004_refuses_unknown_schemes_naming_them(gallery_url: str) -> None:
    engine = make_engine(gallery_url)
    try:
        upgrade(engine, BEFORE)
        _rows_at_0003(engine, [("xnn", 1), ("xnn", 2), ("mystery", 1)])
        with pytest.raises(RuntimeError, match=r"'mystery' v1, 'xnn' v2 have no known config digest"):
            upgrade(engine)
        assert current_revision(engine) == BEFORE
        assert "config_digest" not in {c["name"] for c in inspect(engine).get_columns("templates")}
    finally:
        engine.dispose()


def test_0004_refuses_a_sqlite_rebuild_with_foreign_keys_on(tmp_path) -> None:
    """On a connection that enforces foreign keys, dropping the old `templates` would
    cascade-delete migration_items: the revision refuses instead."""
    engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}")  # foreign keys on
    try:
        upgrade(engine, BEFORE)
        _rows_at_0003(engine, [("xnn", 1)])
        cfg = alembic_config()
        with pytest.raises(RuntimeError, match="foreign keys"), engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        assert current_revision(engine) == BEFORE
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM migration_items")) == 1
    finally:
        engine.dispose()


class _FirstChunks(Source):
    """`source` as a run that was stopped after `n` chunks saw it (same job name)."""

    def __init__(self, source: Source, n: int) -> None:
        self.source, self.n, self.name = source, n, source.name

    def count(self) -> int:
        return self.source.count()

    def chunks(self, size: int, after: Cursor = None) -> Iterator[Chunk]:
        return itertools.islice(self.source.chunks(size, after), self.n)

    def purge(self) -> str:
        raise NotImplementedError


def test_0009_a_job_started_before_resumes_after_the_upgrade_and_verifies(
    gallery_url: str, master_key: LocalKeyProvider, erasure: ErasureKeyStore, key, tmp_path
) -> None:
    """A job whose first chunks were recorded the pre-0009 way (one `migration_items` row per
    source row) resumes at its cursor after `db upgrade`, records the rest per chunk, and
    `--verify` counts every source row exactly once across both tables."""
    rng = np.random.default_rng(3)
    rows = SimpleNamespace(
        vectors=rng.normal(size=(600, 128)).astype(np.float32),
        subjects=[f"p{i // 3}" for i in range(600)], ids=list(range(1, 601)),
    )
    src_url = f"sqlite:///{tmp_path / 'src.db'}"
    fill_table(src_url, rows, limit=len(rows.ids))  # type: ignore[arg-type]
    source = open_source(src_url, table="faces", id_column="id", subject_column="person", vector_column="vec")
    protector = create_protector("xnn", key=key, dim=128)
    options = {"extractor_name": "dlib", "extractor_version": "1", "chunk_size": 100, "workers": 1}
    engine = make_engine(gallery_url)
    try:
        with Gallery.open(gallery_url, upgrade=True, master_key=master_key, erasure=erasure) as g:
            first = migrate(_FirstChunks(source, 2), g, protector, **options)
        assert first.written == 200
        # What the code before 0009 left behind: item rows, no chunk rows; then the schema
        # goes back to 0008 and is upgraded again, as `advplugin db upgrade` would.
        with engine.begin() as conn:
            chunks = conn.execute(select(MigrationChunk.first_template_id, MigrationChunk.source_ids)).all()
            for start, blob in chunks:
                conn.execute(insert(MigrationItem), [
                    {"job_id": first.job_id, "source_id": s, "template_id": start + p}
                    for p, s in enumerate(unpack_source_ids(blob))
                ])
            conn.execute(delete(MigrationChunk))
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0008_pending_erasures")
            assert not inspect(conn).has_table("migration_chunks")
        upgrade(engine)

        with Gallery.open(gallery_url, master_key=master_key, erasure=erasure) as g:
            second = migrate(source, g, protector, **options)
            assert (second.resumed_from, second.written, second.rows) == (200, 400, 600)
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT count(*) FROM migration_items")) == 200
                assert conn.scalar(text("SELECT sum(rows) FROM migration_chunks")) == 400
            report = verify_migration(source, g, protector, job_id=second.job_id, collection="default",
                                      samples=100, chunk_size=100)
            assert report.counts_ok and report.passed, report.render()
            assert (report.migrated_rows, report.distinct_migrated, report.templates_present) == (600, 600, 600)
            items = job_items(g, second.job_id)
            stored = g.get_templates(list(items.values()))
            expected = protector.protect(rows.vectors)
            for sid, tid in list(items.items())[::37]:  # each source row became its own template
                assert stored[tid][0] == rows.subjects[int(sid) - 1]
                np.testing.assert_allclose(stored[tid][1], expected[int(sid) - 1], atol=1e-5)
    finally:
        source.close()
        engine.dispose()
