"""Key rotation on a live gallery (SQLite and PostgreSQL): identification through the FAISS
index gives the same answers before, during and after; the old key stops matching; an
interrupted rotation resumes without double-rotating; other schemes are refused."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from advplugin.bulk import plan_rotation, rotate_key
from advplugin.cli.main import main
from advplugin.gallery import Gallery
from advplugin.gallery.index import IndexConfig, TemplateIndex
from advplugin.gallery.matcher import Matcher
from advplugin.keys import load_key
from advplugin.protectors import ProtectorMetadata, create_protector, scheme_info


def _split(rows, n_people: int = 400, n_distractors: int = 800):
    """Enrol the first image of people with two or more, probe with their second image;
    single-image people are distractors."""
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(rows.subjects):
        by_subject[s].append(i)
    multi = [v for v in by_subject.values() if len(v) >= 2][:n_people]
    single = [v[0] for v in by_subject.values() if len(v) == 1][:n_distractors]
    enrol = [v[0] for v in multi] + single
    probes = [v[1] for v in multi]
    return np.array(enrol), np.array(probes)


def _answers(results) -> list[tuple[tuple[str, int], ...]]:
    return [tuple((m.subject, m.template_id) for m in r) for r in results]


def _sims(results) -> np.ndarray:
    return np.array([[m.similarity for m in r] for r in results])


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_live_rotation_keeps_answers_and_retires_the_old_key(
    lfw_rows, database_url, key_files, backend: str
) -> None:
    k1, k2 = load_key(key_files[0]), load_key(key_files[1])
    p1, p2 = (create_protector("xnn", key=k, dim=128) for k in (k1, k2))
    enrol, probe_rows = _split(lfw_rows)
    raw_probes = lfw_rows.vectors[probe_rows]
    truth = [lfw_rows.subjects[i] for i in probe_rows]
    gallery = Gallery.open(database_url(backend, "gallery"), upgrade=True)
    try:
        gallery.add_templates(
            [lfw_rows.subjects[i] for i in enrol], p1.protect(lfw_rows.vectors[enrol]),
            protection=p1.metadata, extractor_name="dlib", extractor_version="test",
        )  # fmt: skip
        index = TemplateIndex(gallery, 128, config=IndexConfig(use_gpu=False, sync_interval=0.0))
        index.rebuild()
        served_by = Matcher(gallery, index, p1.score)
        before = served_by.identify(p1.protect(raw_probes), k=3)
        rank1 = np.mean([r[0].subject == t for r, t in zip(before, truth, strict=True)])
        assert rank1 > 0.5  # a meaningful gallery: most people are found

        during: list[list] = []

        def serve_mid_rotation(chunks: int, rotated: int) -> None:
            if chunks == 2:  # some templates under K2, the rest still under K1
                keys = {g["key_id"] for g in gallery.provenance()}
                assert keys == {k1.key_id, k2.key_id}
                both = Matcher.for_protectors(gallery, index, [p1, p2])
                probes = {p.metadata.key_id: p.protect(raw_probes) for p in (p1, p2)}
                during.append(both.identify(probes, k=3))

        result = rotate_key(gallery, k1, k2, chunk_size=300, on_chunk=serve_mid_rotation)
        assert result.rotated == len(enrol) and result.chunks == -(-len(enrol) // 300)
        assert gallery.count_templates(key_id=k1.key_id) == 0
        assert gallery.count_templates(key_id=k2.key_id) == len(enrol)

        after = Matcher(gallery, index, p2.score).identify(p2.protect(raw_probes), k=3)
        assert len(during) == 1
        for answers in (during[0], after):
            assert _answers(answers) == _answers(before)
            np.testing.assert_allclose(_sims(answers), _sims(before), atol=1e-5)

        # The old key no longer matches: probes protected with K1 find the wrong people,
        # with scores at the level of strangers.
        stale = Matcher(gallery, index, p1.score).identify(p1.protect(raw_probes), k=1)
        stale_rank1 = np.mean([r[0].subject == t for r, t in zip(stale, truth, strict=True)])
        assert stale_rank1 < 0.05
        genuine = np.array([r[0].similarity for r in before])
        assert np.median(_sims(stale)) < np.percentile(genuine, 5)
    finally:
        gallery.close()


def test_interrupted_rotation_resumes_without_double_rotation(
    lfw_rows, database_url, key_files
) -> None:
    k1, k2 = load_key(key_files[0]), load_key(key_files[1])
    p1, p2 = (create_protector("xnn", key=k, dim=128) for k in (k1, k2))
    raw = lfw_rows.vectors[:1000]
    gallery = Gallery.open(database_url("sqlite", "gallery"), upgrade=True)
    try:
        ids = gallery.add_templates(
            lfw_rows.subjects[:1000], p1.protect(raw), protection=p1.metadata,
            extractor_name="dlib", extractor_version="test",
        )  # fmt: skip
        seq = gallery.last_change_seq()

        def crash(chunks: int, rotated: int) -> None:
            if chunks == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            rotate_key(gallery, k1, k2, chunk_size=300, on_chunk=crash)
        assert gallery.count_templates(key_id=k2.key_id) == 600
        assert gallery.count_templates(key_id=k1.key_id) == 400

        plan, already = plan_rotation(gallery, k1, k2)
        assert already == 600 and [g.count for g in plan] == [400]
        assert main(["rotate-key", "--gallery", str(gallery.engine.url), "--old-key",
                     str(key_files[0]), "--new-key", str(key_files[1]), "--no-progress"]) == 0  # fmt: skip
        stored = gallery.get_templates(ids)
        rotated = np.stack([stored[i][1] for i in ids])
        # Each row rotated exactly once: equal to protecting the raw vector with K2 directly.
        np.testing.assert_allclose(rotated, p2.protect(raw), atol=1e-5)
        # Every re-keyed row was logged once for the FAISS index to replay.
        assert len(gallery.changes_since(seq)) == 1000
        assert main(["rotate-key", "--gallery", str(gallery.engine.url), "--old-key",
                     str(key_files[0]), "--new-key", str(key_files[1])]) == 0  # fmt: skip
        assert len(gallery.changes_since(seq)) == 1000  # nothing left: a no-op
    finally:
        gallery.close()


def test_scheme_that_cannot_be_rekeyed_is_refused_with_what_to_do(
    lfw_rows, database_url, key_files, capsys
) -> None:
    k1, k2 = load_key(key_files[0]), load_key(key_files[1])
    p1 = create_protector("xnn", key=k1, dim=128)
    gallery = Gallery.open(database_url("sqlite", "gallery"), upgrade=True)
    try:
        # Rows written by a keyed scheme without an invertible transform. Whether or not
        # such a scheme is registered in this build, rotation must refuse it.
        other = ProtectorMetadata("advface", 1, k1.key_id, 128, 128, scheme_info("advface").config_digest(128))
        gallery.add_templates(
            lfw_rows.subjects[:10], p1.protect(lfw_rows.vectors[:10]), protection=other,
            extractor_name="dlib", extractor_version="test",
        )  # fmt: skip
        before = gallery.get_templates(gallery.subject_template_ids(lfw_rows.subjects[0]))
        code = main(["rotate-key", "--gallery", str(gallery.engine.url), "--old-key",
                     str(key_files[0]), "--new-key", str(key_files[1])])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2
        assert "cannot rotate 10 templates of scheme 'advface'" in err
        assert "raw source" in err and "re-enrol" in err
        assert gallery.count_templates(key_id=k1.key_id) == 10
        after = gallery.get_templates(list(before))
        for tid, (_, vec) in before.items():
            np.testing.assert_array_equal(after[tid][1], vec)
        with pytest.raises(ValueError, match="same key"):
            plan_rotation(gallery, k2, k2)
    finally:
        gallery.close()


def test_rotation_is_audited_per_collection_and_chunk(tmp_path) -> None:
    from advplugin.keys import Key
    from tests.conftest import env_master_key

    k1, k2 = Key.generate(), Key.generate()
    p1 = create_protector("xnn", key=k1, dim=16)
    rng = np.random.default_rng(0)
    gallery = Gallery.open(f"sqlite:///{tmp_path / 'g.db'}", upgrade=True, master_key=env_master_key())
    try:
        for collection, n in (("default", 5), ("other", 3)):
            gallery.add_templates(
                [f"s{i}" for i in range(n)], p1.protect(rng.normal(size=(n, 16)).astype(np.float32)),
                protection=p1.metadata, extractor_name="t", extractor_version="1", collection=collection,
            )  # fmt: skip
        result = rotate_key(gallery, k1, k2, chunk_size=4)
        events = [e for e in gallery.audit_events() if e.action == "rotate_key"]
        assert result.rotated == 8 and result.chunks == 3  # default: 4 + 1, other: 3
        assert [(e.collection, e.template_count, e.actor) for e in events] == [
            ("default", 4, "cli"), ("default", 1, "cli"), ("other", 3, "cli"),
        ]
    finally:
        gallery.close()
