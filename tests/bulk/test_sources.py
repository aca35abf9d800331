"""Source readers: every storage layout decodes to exactly the stored vectors, pages resume
exactly at their cursor, and invalid rows are named by id without echoing values."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import faiss
import numpy as np
import pytest
import sqlalchemy as sa

from advplugin.bulk import open_source, validate_source
from tests.bulk.conftest import fill_table

N = 600  # a slice of lfw-dev is enough to exercise paging


def _read_all(source, size: int, after=None):
    ids, subjects, vecs = [], [], []
    for chunk in source.chunks(size, after):
        assert not chunk.bad
        ids += chunk.ids
        subjects += chunk.subjects
        vecs.append(chunk.vectors)
    return ids, subjects, np.concatenate(vecs) if vecs else np.zeros((0, 128), np.float32)


@pytest.mark.parametrize(
    ("backend", "fmt"),
    [("sqlite", "bytes"), ("sqlite", "json"), ("postgresql", "bytes"), ("postgresql", "array")],
)
def test_sql_table_formats_decode_exactly_and_resume_at_cursor(
    lfw_rows, database_url, backend: str, fmt: str
) -> None:
    url = database_url(backend, "src")
    fill_table(url, lfw_rows, vector_format=fmt, limit=N)
    source = open_source(
        url, table="faces", subject_column="person", vector_column="vec", id_column="id"
    )
    try:
        assert source.count() == N
        ids, subjects, vecs = _read_all(source, 128)
        assert ids == [str(i) for i in lfw_rows.ids[:N]]
        assert subjects == lfw_rows.subjects[:N]
        # bytes and REAL[] are float32 exactly; JSON text of float32 values round-trips too
        np.testing.assert_array_equal(vecs, lfw_rows.vectors[:N])

        chunks = list(source.chunks(128))
        resumed = _read_all(source, 128, after=chunks[1].cursor)
        assert resumed[0] == ids[256:]
    finally:
        source.close()


def test_invalid_rows_are_named_by_id_never_by_value(lfw_rows, database_url) -> None:
    url = database_url("sqlite", "src")
    fill_table(url, lfw_rows, vector_format="json", limit=50)
    engine = sa.create_engine(url)
    secret_value = "0.123456789"
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE faces SET vec = '[NaN, 1.0]' WHERE id = 3")
        conn.exec_driver_sql(f"UPDATE faces SET vec = '[{secret_value}, 1.0]' WHERE id = 5")
        conn.exec_driver_sql("UPDATE faces SET vec = NULL WHERE id = 7")
        conn.exec_driver_sql(f"UPDATE faces SET vec = 'not json {secret_value}' WHERE id = 9")
        zeros = json.dumps([0.0] * 128)
        conn.exec_driver_sql(f"UPDATE faces SET vec = '{zeros}' WHERE id = 11")
        nan = json.dumps([1.0] * 127 + [float("inf")]).replace("Infinity", "1e999")
        conn.exec_driver_sql(f"UPDATE faces SET vec = '{nan}' WHERE id = 13")
    engine.dispose()
    source = open_source(url, table="faces", subject_column="person", vector_column="vec")
    report = validate_source(source, chunk_size=16)
    source.close()
    assert not report.ok
    assert report.rows == 50 and report.dim == 128
    bad = dict(report.examples)
    assert set(bad) == {"3", "5", "7", "9", "11", "13"}
    assert "dimension 2" in bad["3"] and "NULL" in bad["7"] and "JSON" in bad["9"]
    assert "zero" in bad["11"] and "infinite" in bad["13"]
    assert all(secret_value not in p for p in report.problems())


def test_npz_npy_and_faiss_sources(lfw_rows, tmp_path: Path) -> None:
    vecs, subjects = lfw_rows.vectors[:N], lfw_rows.subjects[:N]
    paths = np.array([f"{s}/{i}.jpg" for i, s in enumerate(subjects)])
    np.savez(tmp_path / "set.npz", embedding=vecs, identity=np.array(subjects), path=paths)
    np.save(tmp_path / "vecs.npy", vecs)
    (tmp_path / "rows.csv").write_text(
        "id,subject\n" + "".join(f"{i},{s}\n" for i, s in enumerate(subjects))
    )
    faiss_ids = np.arange(N, dtype=np.int64) * 7 + 1000
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(128))
    index.add_with_ids(vecs, faiss_ids)
    faiss.write_index(index, str(tmp_path / "feat.faiss"))
    (tmp_path / "ids.json").write_text(
        json.dumps({str(i): s for i, s in zip(faiss_ids, subjects, strict=True)})
    )

    cases = [
        (open_source(str(tmp_path / "set.npz")), list(paths)),
        (open_source(str(tmp_path / "vecs.npy"), mapping=str(tmp_path / "rows.csv")), None),
        (
            open_source(str(tmp_path / "feat.faiss"), mapping=str(tmp_path / "ids.json")),
            [str(i) for i in faiss_ids],
        ),
    ]
    for source, want_ids in cases:
        ids, got_subjects, got = _read_all(source, 97)
        np.testing.assert_array_equal(got, vecs)
        assert got_subjects == subjects
        assert ids == (want_ids or [str(i) for i in range(N)])
        assert _read_all(source, 97, after=194)[0] == ids[194:]
        source.close()

    (tmp_path / "short.csv").write_text("id,subject\n0,a\n")
    with pytest.raises(ValueError, match="no subject for 599"):
        open_source(str(tmp_path / "vecs.npy"), mapping=str(tmp_path / "short.csv"))
    with pytest.raises(ValueError, match="needs --mapping"):
        open_source(str(tmp_path / "feat.faiss"))


def test_names_take_their_canonical_form_and_lookalikes_are_reported(tmp_path: Path) -> None:
    """Names are migrated in the gallery's canonical form (NFC, trimmed). Two of the
    source's names that only look different would become ONE subject: validation names
    them and refuses (nothing is merged silently); a name with a control character is an
    invalid row, named by id."""
    nfc = unicodedata.normalize("NFC", "Zoë")
    nfd = unicodedata.normalize("NFD", nfc)
    names = [nfc, nfd, " Ann ", "Bo", "Line\nBreak", " Cy"]
    vecs = np.random.default_rng(0).normal(size=(len(names), 8)).astype(np.float32)
    path = tmp_path / "set.npz"
    np.savez(path, embedding=vecs, identity=np.array(names), path=np.array([f"r{i}" for i in range(len(names))]))
    source = open_source(str(path))
    chunks = list(source.chunks(4, None))
    assert [s for c in chunks for s in c.subjects] == [nfc, nfc, "Ann", "Bo", "Cy"]
    report = validate_source(source, chunk_size=4)
    assert report.name_collisions == {nfc: sorted([nfc, nfd])}  # " Ann " alone is no collision
    assert report.bad == 1 and report.examples[0][0] == "r4" and "control" in report.examples[0][1]
    assert not report.ok and any("merged into one subject" in p for p in report.problems())
    np.savez(path, embedding=vecs[2:4], identity=np.array(names[2:4]), path=np.array(["a", "b"]))
    clean = validate_source(open_source(str(path)), chunk_size=4)
    assert clean.ok and clean.subjects == 2
