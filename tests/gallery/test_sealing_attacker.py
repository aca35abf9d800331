"""The attacker of issue 10, against sealed storage: they enrolled 1,000 faces of their
choice (so they hold 1,000 raw embeddings and know which rows are theirs), then copied the
database and the index snapshot. With everything but the master key (the code, its
defaults, the xnn key's absence does not matter: they fit a map from stored bytes to raw
embeddings on their own 1,000 rows) they try to tell who the other rows are, by matching
them against photos of the people they are looking for (the lfw-dev dlib embeddings).

Controls make each check able to fail: the same attack on an unsealed copy of the same
gallery identifies most people, and the byte tests reject plaintext rows.
"""

from __future__ import annotations

import math
import secrets
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from advplugin.embedding_files import load_embedding_set
from advplugin.gallery import Gallery, make_engine
from advplugin.gallery.index import TemplateIndex
from advplugin.gallery.master_keys import LocalKeyProvider
from advplugin.gallery.sealing import NONCE_BYTES, TamperedError
from advplugin.protectors import create_protector
from tests.service.helpers import vectors_in_blob

N_CHOSEN = 1000
N_VICTIMS = 300


def _split(identity: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """(victims' enrolled images, victims' probe photos, the attacker's chosen images): one
    enrolled and one probe image per victim identity; chosen images of other people."""
    by_id: dict[str, list[int]] = {}
    for i, s in enumerate(identity):
        by_id.setdefault(str(s), []).append(i)
    names = sorted(by_id)
    victims = [n for n in names if len(by_id[n]) >= 2][:N_VICTIMS]
    enrolled = [by_id[n][0] for n in victims]
    probes = [by_id[n][1] for n in victims]
    taken = set(victims)
    chosen = [i for n in names if n not in taken for i in by_id[n]][:N_CHOSEN]
    assert len(chosen) == N_CHOSEN and len(victims) == N_VICTIMS
    return enrolled, probes, chosen


def _gallery(url: str, master_key: LocalKeyProvider | None, key, emb, enrolled, chosen, snapshot: Path) -> list[str]:
    """Enrol the victims under pseudonyms (subject names are stored in the clear, see
    docs/sealed-storage.md), then the attacker's chosen faces; write the index snapshot."""
    p = create_protector("xnn", key=key, dim=128)
    pseudonyms = [f"subject-{secrets.token_hex(6)}" for _ in enrolled]
    with Gallery.open(url, upgrade=True, master_key=master_key) as g:
        kw = {"protection": p.metadata, "extractor_name": "dlib", "extractor_version": "1"}
        g.add_templates(pseudonyms, p.protect(emb[enrolled]), **kw)
        g.add_templates([f"attacker-{j}" for j in range(len(chosen))], p.protect(emb[chosen]), **kw)
        index = TemplateIndex(g, 128, snapshot_path=snapshot)
        index.rebuild()
        index.save()
    return pseudonyms


def _leak(url: str) -> dict[str, bytes]:
    """What the thief reads from the copied database: subject name -> stored vector bytes."""
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT s.name, t.vector FROM templates t JOIN subjects s ON s.id = t.subject_id ORDER BY t.id"))
        out = {str(n): bytes(v) for n, v in rows}
    engine.dispose()
    return out


def _attack(leak: dict[str, bytes], emb, chosen, pseudonyms, probes) -> int:
    """Least squares from stored bytes to raw embeddings on the 1,000 known pairs, applied to
    the other rows; returns how many victims' probe photos find their own row at rank 1."""
    def features(b: bytes) -> np.ndarray:  # plaintext rows as floats, sealed ones as bytes
        kind = "<f4" if len(b) == 4 * 128 else np.uint8
        return np.frombuffer(b, kind).astype(np.float64)

    x = np.stack([features(leak[f"attacker-{j}"]) for j in range(len(chosen))])
    x = np.hstack([x, np.ones((len(x), 1))])
    w, *_ = np.linalg.lstsq(x, emb[chosen].astype(np.float64), rcond=None)
    v = np.stack([features(leak[n]) for n in pseudonyms])
    est = np.hstack([v, np.ones((len(v), 1))]) @ w
    est /= np.linalg.norm(est, axis=1, keepdims=True) + 1e-12
    q = emb[probes] / np.linalg.norm(emb[probes], axis=1, keepdims=True)
    return int((np.argmax(q @ est.T, axis=1) == np.arange(len(probes))).sum())


def _chance_bound(n: int, alpha: float = 1e-4) -> int:
    """The smallest k with P(Binomial(n, 1/n) >= k) < alpha: more rank-1 hits than this are
    not chance."""
    p = 1.0 / n
    tail = 1.0
    for k in range(n + 1):
        if tail < alpha:
            return k
        tail -= math.comb(n, k) * p**k * (1 - p) ** (n - k)
    return n


def _entropy(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256).astype(np.float64)
    p = counts[counts > 0] / len(data)
    return float(-(p * np.log2(p)).sum())


def test_a_stolen_sealed_gallery_reveals_nothing_to_a_chosen_enrolment_attacker(face_data, key, tmp_path) -> None:
    es = load_embedding_set(face_data / "lfw-dev-dlib128.npz")
    emb, identity = np.asarray(es.embedding, np.float32), np.asarray(es.identity)
    enrolled, probes, chosen = _split(identity)
    master = LocalKeyProvider.from_file(tmp_path / "keys" / "master.key", create=True)
    data = tmp_path / "data"
    sealed_url = f"sqlite:///{data / 'gallery.db'}"
    data.mkdir()
    pseudonyms = _gallery(sealed_url, master, key, emb, enrolled, chosen, data / "index" / "snap.npz")
    # Control: the same gallery unsealed (what every gallery was before sealed storage).
    plain_url = f"sqlite:///{tmp_path / 'plain.db'}"
    plain_names = _gallery(plain_url, None, key, emb, enrolled, chosen, tmp_path / "plain-snap.npz")

    # The theft: the data folder (database, WAL, snapshot), not the master key kept apart.
    stolen = tmp_path / "stolen"
    shutil.copytree(data, stolen)
    leak = _leak(f"sqlite:///{stolen / 'gallery.db'}")
    bound = _chance_bound(N_VICTIMS)
    control_hits = _attack(_leak(plain_url), emb, chosen, plain_names, probes)
    assert control_hits > 10 * bound  # the attack works on plaintext storage
    hits = _attack(leak, emb, chosen, pseudonyms, probes)
    assert hits < bound, f"{hits} of {N_VICTIMS} victims identified (chance: about 1)"

    # Bytes level: no shared nonce or prefix, entropy of uniformly random bytes.
    rows = list(leak.values())
    assert len({r[:NONCE_BYTES] for r in rows}) == len(rows)
    assert len({r[:8] for r in rows}) == len(rows)
    everything = b"".join(rows)
    slack = 10 * 255 / (2 * len(everything) * math.log(2))  # 10x the small-sample deficit
    assert _entropy(everything) > 8 - slack
    assert _entropy(b"".join(_leak(plain_url).values())) < 8 - slack  # control: floats are not
    # The stolen snapshot: no vector inside, random-looking bytes.
    (snap,) = (stolen / "index").glob("*.npz")
    with np.load(snap) as d:
        blob = bytes(d["index"])
    assert len(vectors_in_blob(blob, 128)) == 0
    assert len(vectors_in_blob((tmp_path / "plain-snap.npz").read_bytes(), 128)) >= len(enrolled)  # control
    assert _entropy(blob) > 8 - 10 * 255 / (2 * len(blob) * math.log(2))

    # Rows swapped in the copy, or the copy's rows planted into the live gallery: detected on
    # load (the index rebuild reads every row through authentication).
    copy_url = f"sqlite:///{stolen / 'gallery.db'}"
    engine = make_engine(copy_url)
    with engine.begin() as conn:
        (a, va), (b, vb) = conn.execute(text("SELECT id, vector FROM templates ORDER BY id LIMIT 2")).all()
        conn.execute(text("UPDATE templates SET vector = :v WHERE id = :i"), [{"v": vb, "i": a}, {"v": va, "i": b}])
    engine.dispose()
    with Gallery.open(copy_url, master_key=master) as g, pytest.raises(TamperedError, match=f"template {a}"):
        TemplateIndex(g, 128).rebuild()
