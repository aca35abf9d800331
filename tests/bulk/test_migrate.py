"""Migrating the lfw-dev embeddings from real SQLite and PostgreSQL tables into protected
galleries on both, verify agreement against the offline computation, idempotency, purge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from advplugin.bulk import migrate, open_source, verify_migration
from advplugin.bulk.models import MigrationChunk, MigrationItem, MigrationJob
from advplugin.bulk.verify import job_items
from advplugin.cli.main import main
from advplugin.gallery import Gallery
from advplugin.keys import load_key
from advplugin.protectors import create_protector
from advplugin.protectors.base import l2_normalize
from tests.bulk.conftest import fill_table

SOURCE_ARGS = dict(table="faces", id_column="id", subject_column="person", vector_column="vec")


def offline_top1(rows, probe_rows: np.ndarray, protector) -> tuple[np.ndarray, np.ndarray]:
    """Rank-1 identity of each probe among all other rows: raw cosine vs protected scores."""
    subjects = np.array(rows.subjects, dtype=object)
    everyone = np.arange(len(probe_rows))
    raw = l2_normalize(rows.vectors)
    s_raw = raw[probe_rows] @ raw.T
    s_raw[everyone, probe_rows] = -np.inf
    templates = protector.protect(rows.vectors)
    s_prot = protector.score(templates[probe_rows], templates)
    s_prot[everyone, probe_rows] = -np.inf
    return subjects[np.argmax(s_raw, axis=1)], subjects[np.argmax(s_prot, axis=1)]


def _migrate(source, gallery, protector, **options):
    return migrate(
        source, gallery, protector, extractor_name="dlib", extractor_version="test", **options
    )


def item_map(gallery: Gallery, job_id: int) -> dict[str, int]:
    return job_items(gallery, job_id)


@pytest.mark.parametrize("target", ["sqlite", "postgresql"])
@pytest.mark.parametrize("origin", ["sqlite", "postgresql"])
def test_lfw_table_migrates_exactly_and_verify_equals_offline_agreement(
    lfw_rows, database_url, key_files, origin: str, target: str
) -> None:
    src_url = database_url(origin, "src")
    fill_table(src_url, lfw_rows)
    protector = create_protector("xnn", key=load_key(key_files[0]), dim=128)
    source = open_source(src_url, **SOURCE_ARGS)
    gallery = Gallery.open(database_url(target, "gallery"), upgrade=True)
    try:
        result = _migrate(source, gallery, protector, chunk_size=3000, workers=2)
        assert result.written == result.rows == len(lfw_rows) and result.chunks == 4

        # Exactly the source's rows: each source id became one template, and that template
        # is the protection of that row's raw vector (not of a neighbour's).
        items = item_map(gallery, result.job_id)
        assert sorted(items) == sorted(str(i) for i in lfw_rows.ids)
        assert gallery.count_templates() == len(lfw_rows)
        stored = gallery.get_templates(list(items.values()))
        expected = protector.protect(lfw_rows.vectors)
        for sid, tid in list(items.items())[::97]:
            subject, vector = stored[tid]
            assert subject == lfw_rows.subjects[int(sid) - 1]
            np.testing.assert_allclose(vector, expected[int(sid) - 1], atol=1e-6)

        report = verify_migration(
            source,
            gallery,
            protector,
            job_id=result.job_id,
            collection="default",
            samples=1500,
            top_k=5,
            chunk_size=4000,
        )
        probe_rows = np.array([int(p) - 1 for p in report.probe_ids])
        raw_top1, prot_top1 = offline_top1(lfw_rows, probe_rows, protector)
        assert report.raw_top1 == list(raw_top1)
        assert report.protected_top1 == list(prot_top1)
        assert report.rank1_agreement == float(np.mean(raw_top1 == prot_top1))
        assert report.counts_ok and report.passed

        # Idempotent: the same job again writes nothing.
        again = _migrate(source, gallery, protector, chunk_size=3000)
        assert again.written == 0 and again.rows == len(lfw_rows)
        assert gallery.count_templates() == len(lfw_rows)
    finally:
        source.close()
        gallery.close()


def test_verify_fails_when_the_gallery_does_not_answer_like_the_source(
    lfw_rows, database_url, key_files
) -> None:
    src_url = database_url("sqlite", "src")
    fill_table(src_url, lfw_rows, limit=2000)
    k1 = create_protector("xnn", key=load_key(key_files[0]), dim=128)
    k2 = create_protector("xnn", key=load_key(key_files[1]), dim=128)
    source = open_source(src_url, **SOURCE_ARGS)
    gallery = Gallery.open(database_url("sqlite", "gallery"), upgrade=True)
    try:
        result = _migrate(source, gallery, k1)
        kwargs = dict(job_id=result.job_id, collection="default", samples=300)
        good = verify_migration(source, gallery, k1, **kwargs)
        assert good.passed
        # Probes protected with another key cannot find their people: verify must notice.
        wrong_key = verify_migration(source, gallery, k2, **kwargs)
        assert not wrong_key.passed and wrong_key.rank1_agreement < 0.5
        # A template lost after migration: counts no longer add up.
        gallery.delete_subject(lfw_rows.subjects[0])
        lost = verify_migration(source, gallery, k1, **kwargs)
        assert not lost.counts_ok and not lost.passed
    finally:
        source.close()
        gallery.close()


def _raw_bytes_present(blob: bytes, vectors: np.ndarray) -> bool:
    """Any raw vector (as stored, or L2-normalised) appearing in a file's bytes."""
    for v in vectors:
        for form in (v, v / np.linalg.norm(v)):
            if form.astype("<f4").tobytes()[:32] in blob:
                return True
    return False


def test_cli_dry_run_then_verify_gated_purge(
    lfw_rows, database_url, key_files, tmp_path: Path, capsys
) -> None:
    n = 1500
    src_url = database_url("sqlite", "src")
    fill_table(src_url, lfw_rows, limit=n)
    gallery_url = f"sqlite:///{tmp_path / 'gallery.db'}"
    args = [
        "migrate",
        "--from",
        src_url,
        "--table",
        "faces",
        "--subject-column",
        "person",
        "--vector-column",
        "vec",
        "--to",
        gallery_url,
        "--scheme",
        "xnn",
        "--key",
        str(key_files[0]),
        "--extractor",
        "dlib",
        "--chunk-size",
        "400",
        "--no-progress",
    ]
    Gallery.open(gallery_url, upgrade=True).close()

    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"rows: {n}, dimension 128" in out and "dry run: nothing written" in out
    with Gallery.open(gallery_url) as g:
        assert g.count_templates(collection=None) == 0
        with g.engine.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(MigrationJob)) == 0

    # The `none` baseline would copy raw embeddings into the gallery: refused.
    raw_copy = [a if a != "xnn" else "none" for a in args]
    assert main(raw_copy) == 2
    assert "does not protect" in capsys.readouterr().err
    with Gallery.open(gallery_url) as g:
        assert g.count_templates(collection=None) == 0

    # Verify that cannot pass -> no purge, source untouched.
    assert main([*args, "--verify", "--purge-source", "--min-agreement", "1.01"]) == 1
    out = capsys.readouterr().out
    assert "verify: FAILED" in out and "purge: NOT done" in out
    engine = sa.create_engine(src_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(vec) FROM faces").scalar() == n

    with_progress = [a for a in args if a != "--no-progress"]
    assert main([*with_progress, "--verify", "--purge-source"]) == 0
    out, err = capsys.readouterr()
    assert "validate: 100%" in err and "vec/s" in err  # progress bar with rate
    assert "migrated: 0 rows" in out  # already done: nothing written twice
    assert "verify: PASSED" in out
    assert f"purge: set vec to NULL on {n} rows" in out
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(vec) FROM faces").scalar() == 0
        assert conn.exec_driver_sql("SELECT count(*) FROM faces").scalar() == n
    engine.dispose()
    with Gallery.open(gallery_url) as g:
        assert g.count_templates() == n

    # The raw vectors never reached the gallery database (file and WAL).
    for suffix in ("", "-wal"):
        path = tmp_path / f"gallery.db{suffix}"
        if path.exists():
            assert not _raw_bytes_present(path.read_bytes(), lfw_rows.vectors[:n:50])


@pytest.mark.parametrize("target", ["sqlite", "postgresql"])
def test_chunks_are_recorded_once_and_ids_a_client_may_hold_row_by_row(
    lfw_rows, database_url, key_files, tmp_path: Path, target: str
) -> None:
    """Integer source ids: one `migration_chunks` row per chunk (row i became template
    first + i), no per-row item. Text ids (an .npz's image paths, CompreFace's UUIDs): also
    one `migration_items` row each, which is how the service resolves an image id it was
    given before the migration. Both verify."""
    n = 900
    npz = tmp_path / "faces.npz"
    paths = np.array([f"lfw/{s}/{i:04d}.jpg" for i, s in enumerate(lfw_rows.subjects[:n])])
    np.savez(npz, embedding=lfw_rows.vectors[:n], path=paths, identity=np.array(lfw_rows.subjects[:n]))
    src_url = database_url("sqlite", "src")
    fill_table(src_url, lfw_rows, limit=n)
    protector = create_protector("xnn", key=load_key(key_files[0]), dim=128)
    gallery = Gallery.open(database_url(target, "gallery"), upgrade=True)
    sources = [open_source(src_url, **SOURCE_ARGS), open_source(str(npz))]
    try:
        for source, per_row in zip(sources, (0, n), strict=True):
            result = _migrate(source, gallery, protector, chunk_size=400, collection=f"c{per_row}")
            with gallery.engine.connect() as conn:
                chunks = conn.execute(
                    sa.select(MigrationChunk.seq, MigrationChunk.first_template_id, MigrationChunk.last_template_id,
                              MigrationChunk.rows, MigrationChunk.source_ids)
                    .where(MigrationChunk.job_id == result.job_id).order_by(MigrationChunk.seq)
                ).all()
                items = conn.scalar(sa.select(sa.func.count()).select_from(MigrationItem)
                                    .where(MigrationItem.job_id == result.job_id))
            assert [(c.seq, c.rows) for c in chunks] == [(1, 400), (2, 400), (3, 100)]
            assert all(c.last_template_id - c.first_template_id + 1 == c.rows for c in chunks)
            assert items == per_row
            assert all((c.source_ids is None) == bool(per_row) for c in chunks)
            mapping = job_items(gallery, result.job_id)
            assert len(mapping) == n and len(set(mapping.values())) == n
            report = verify_migration(source, gallery, protector, job_id=result.job_id,
                                      collection=f"c{per_row}", samples=200)
            assert report.passed, report.render()
    finally:
        for s in sources:
            s.close()
        gallery.close()
