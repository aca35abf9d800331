"""The gallery's one matcher: any number of keys, the scheme's own scorer, configurable
candidates. (Rotation end to end: tests/bulk/test_rotate.py and tests/service/test_rotation.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from advplugin.gallery import Gallery
from advplugin.gallery.backends import IndexConfig
from advplugin.gallery.index import TemplateIndex
from advplugin.gallery.matcher import Matcher
from advplugin.keys import Key
from advplugin.protectors import create_protector

DIM = 32


@pytest.fixture
def two_keys(gallery: Gallery):
    """Subjects s0..s19; even ones enrolled under key 1, odd ones under key 2 (a gallery
    half-way through a key rotation), and the raw vectors to make probes from."""
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(20, DIM)).astype(np.float32)
    p1, p2 = (create_protector("xnn", key=Key.generate(), dim=DIM) for _ in range(2))
    for p, rows in ((p1, range(0, 20, 2)), (p2, range(1, 20, 2))):
        rows = list(rows)
        gallery.add_templates(
            [f"s{i}" for i in rows], p.protect(raw[rows]), protection=p.metadata,
            extractor_name="test", extractor_version="1",
        )  # fmt: skip
    index = TemplateIndex(gallery, DIM, config=IndexConfig(use_gpu=False, sync_interval=0.0))
    index.rebuild()
    return raw, p1, p2, index


def test_several_keys_each_template_under_its_own_key(gallery: Gallery, two_keys) -> None:
    raw, p1, p2, index = two_keys
    both = Matcher.for_protectors(gallery, index, [p1, p2])
    probes = {p.metadata.key_id: p.protect(raw) for p in (p1, p2)}
    answers = both.identify(probes, k=1)
    assert [a[0].subject for a in answers] == [f"s{i}" for i in range(20)]
    assert all(abs(a[0].similarity - 1.0) < 1e-4 for a in answers)
    for i in (4, 7):
        assert both.verify({k: v[i : i + 1] for k, v in probes.items()}, f"s{i}").similarity > 0.999
    # Under one key only, templates under the other key are strangers: half the people are
    # found, the other half are not (a probe under K1 says nothing about a template under K2).
    one = Matcher.for_protectors(gallery, index, [p1]).identify(p1.protect(raw), k=1)
    found = [a[0].subject == f"s{i}" and a[0].similarity > 0.999 for i, a in enumerate(one)]
    assert found == [i % 2 == 0 for i in range(20)]


def test_the_schemes_own_scorer_ranks_not_the_index(gallery: Gallery, two_keys) -> None:
    raw, p1, _, index = two_keys
    t = p1.protect(raw)

    def farthest_first(probes: np.ndarray, templates: np.ndarray) -> np.ndarray:
        return -p1.score(probes, templates)

    plain = Matcher(gallery, index, {p1.metadata.key_id: p1.score}).identify(t[:1], k=3)
    inverted = Matcher(gallery, index, {p1.metadata.key_id: farthest_first}).identify(t[:1], k=3)
    assert plain[0][0].subject == "s0"
    assert "s0" not in {m.subject for m in inverted[0]}  # the index's best is the scorer's worst
    assert [m.similarity for m in inverted[0]] == sorted((m.similarity for m in inverted[0]), reverse=True)


def test_candidates_bound_what_is_rescored(gallery: Gallery, two_keys) -> None:
    raw, p1, _, index = two_keys
    t = p1.protect(raw)
    calls: list[int] = []

    def counting(probes: np.ndarray, templates: np.ndarray) -> np.ndarray:
        calls.append(len(templates))
        return p1.score(probes, templates)

    Matcher(gallery, index, counting, candidates=7).identify(t[:1], k=1)
    assert calls == [7]
    with pytest.raises(ValueError, match="candidates"):
        Matcher(gallery, index, counting, candidates=0)


def test_probes_must_match_the_keys_served(gallery: Gallery, two_keys) -> None:
    raw, p1, p2, index = two_keys
    both = Matcher.for_protectors(gallery, index, [p1, p2])
    with pytest.raises(ValueError, match="each key id"):
        both.identify(p1.protect(raw), k=1)
    with pytest.raises(ValueError, match="does not serve"):
        Matcher.for_protectors(gallery, index, [p1]).identify({p2.metadata.key_id: p2.protect(raw)})
    with pytest.raises(ValueError, match="same key id"):
        Matcher.for_protectors(gallery, index, [p1, p1])


def test_index_scores_equal_the_rescored_ones_for_a_cosine_scheme(gallery: Gallery, two_keys) -> None:
    raw, p1, _, index = two_keys
    probes = p1.protect(raw + 0.3 * np.random.default_rng(1).normal(size=raw.shape).astype(np.float32))
    fast = Matcher(gallery, index, p1.score_fn)  # CosineScorer: the index's scores are final
    slow = Matcher(gallery, index, lambda a, b: p1.score(a, b))  # any other callable: re-scored
    for a, b in zip(fast.identify(probes, k=5), slow.identify(probes, k=5), strict=True):
        assert [m.subject for m in a] == [m.subject for m in b]
        np.testing.assert_allclose([m.similarity for m in a], [m.similarity for m in b], atol=1e-5)


def test_names_survive_a_snapshot_load_and_deletes_are_honoured(gallery: Gallery, two_keys, tmp_path) -> None:
    raw, p1, _, index = two_keys
    index.snapshot_path = tmp_path / "snap.npz"
    index.save()
    loaded = TemplateIndex(
        gallery, DIM, config=IndexConfig(use_gpu=False, sync_interval=0.0), snapshot_path=index.snapshot_path
    )
    assert loaded.load()
    matcher = Matcher(gallery, loaded, p1.score_fn)
    assert [a[0].subject for a in matcher.identify(p1.protect(raw[:6:2]))] == ["s0", "s2", "s4"]
    gallery.delete_subject("s2")
    loaded.catch_up()
    assert "s2" not in {m.subject for m in matcher.identify(p1.protect(raw[2:3]), k=20)[0]}


def test_identify_while_subjects_are_deleted_never_fails(gallery: Gallery, two_keys) -> None:
    import threading

    raw, p1, _, index = two_keys
    matcher = Matcher(gallery, index, lambda a, b: p1.score(a, b))  # re-scoring path reads vectors
    errors: list[BaseException] = []

    def identify_loop() -> None:
        try:
            for _ in range(30):
                matcher.identify(p1.protect(raw), k=3)
        except BaseException as e:  # any failure is the finding
            errors.append(e)

    t = threading.Thread(target=identify_loop)
    t.start()
    for i in range(0, 20, 2):
        gallery.delete_subject(f"s{i}")
        index.catch_up()
    t.join()
    assert not errors
    remaining = {m.subject for r in matcher.identify(p1.protect(raw), k=20) for m in r}
    assert not remaining & {f"s{i}" for i in range(0, 20, 2)}


def test_top1_of_a_batch_equals_the_first_of_the_ranked_walk(gallery: Gallery, two_keys) -> None:
    raw, p1, _, index = two_keys
    probes = p1.protect(raw + 0.5 * np.random.default_rng(2).normal(size=raw.shape).astype(np.float32))
    matcher = Matcher(gallery, index, p1.score_fn)
    for threshold in (None, 0.5, 2.0):
        top1 = matcher.identify(probes, k=1, threshold=threshold)  # vectorised over the batch
        walk = matcher.identify(probes, k=2, threshold=threshold)  # per-row walk
        assert top1 == [w[:1] for w in walk]
        # One probe per call (the request's usual shape) takes its own short walk: same answers.
        assert [matcher.identify(probes[i : i + 1], k=1, threshold=threshold)[0] for i in range(len(probes))] == top1
    assert matcher.identify(probes, k=1, threshold=2.0) == [[]] * len(probes)


def test_one_probe_takes_its_best_candidate_or_walks_on_like_the_batch(gallery: Gallery, two_keys, tmp_path) -> None:
    """The one-probe path reads only the best candidate's subject: when that one has none
    (its subject deleted between the search and the naming) it walks on as the batch path
    does, and after a snapshot load (an empty subject map) it names the best from SQL."""
    raw, p1, _, index = two_keys
    matcher = Matcher(gallery, index, p1.score_fn)
    probe = p1.protect(raw[4:5])
    (best,) = matcher.identify(probe, k=1)[0]
    assert best.subject == "s4"
    index._subjects.remove([best.template_id])  # the race, frozen
    (walked,) = matcher.identify(np.repeat(probe, 2, axis=0), k=1)[0]  # the batch path
    assert walked.subject != "s4" and matcher.identify(probe, k=1)[0] == [walked]
    assert matcher.identify(probe, k=1, threshold=walked.similarity + 1e-3) == [[]]

    index._subjects.set([best.template_id], ["s4"])
    index.snapshot_path = tmp_path / "snap.npz"
    index.save()
    loaded = TemplateIndex(
        gallery, DIM, config=IndexConfig(use_gpu=False, sync_interval=0.0), snapshot_path=index.snapshot_path
    )
    assert loaded.load()
    assert Matcher(gallery, loaded, p1.score_fn).identify(probe, k=1) == [[best]]


def test_subject_map_names_only_what_it_holds() -> None:
    """The map's gather needs no mask: a -1 id (a short result) and an id it never saw are
    both unnamed (-1), whatever the ids it holds, before and after growing."""
    from advplugin.gallery.subject_map import SubjectMap

    m = SubjectMap()
    assert m.codes(np.array([[-1, 5]])).tolist() == [[-1, -1]]
    for top in (3, 1023, 1024, 5000):  # around the growth steps
        m.set([top], [f"p{top}"])
        codes = m.codes(np.array([top, -1, top + 1, 10**9]))
        assert m.name(int(codes[0])) == f"p{top}" and codes[1:].tolist() == [-1, -1, -1]
    m.remove([5000])
    assert m.codes(np.array([5000, 3])).tolist()[0] == -1 and m.name(int(m.codes(np.array([3]))[0])) == "p3"
