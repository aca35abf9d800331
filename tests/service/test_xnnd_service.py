"""`xnn-d` in the service, both modes, over real HTTP on SQLite: template mode (the server
holds no key and scores with the scheme's keyless scorer) gives the offline rank-1 of
`xnn-d` on the same embeddings; image mode (the server extracts with dlib, protects with
`xnn-d` under its key file) identifies real photos as the offline pipeline does, and the
stored templates are the protected ones, not the raw embeddings."""

from __future__ import annotations

import numpy as np

from advplugin.adapters import create_extractor
from advplugin.evaluation.metrics import rank1_identification
from advplugin.gallery import Gallery
from advplugin.images import load_image
from advplugin.keys import load_key
from advplugin.protectors import create_protector
from tests.conftest import env_erasure_store, env_master_key
from tests.service.conftest import migrated_database
from tests.service.helpers import example_client_module, first_vs_rest, max_cosine, protection_of


def test_template_mode_rank1_equals_offline(lfw_cache, key, tmp_path, make_server, request) -> None:
    emb, identity, path = lfw_cache["embedding"], lfw_cache["identity"], lfw_cache["path"]
    g_idx, p_idx = first_vs_rest(identity, path, max_identities=200)
    protector = create_protector("xnn-d", key=key, dim=128)  # the client's middleware
    gallery_t, probe_t = protector.protect(emb[g_idx]), protector.protect(emb[p_idx])
    offline = rank1_identification(
        protector.score(probe_t, gallery_t), identity[p_idx], identity[g_idx]
    )
    url = migrated_database("sqlite", tmp_path, request)
    server = make_server({
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
        "ADVPLUGIN_MODE": "templates", "ADVPLUGIN_SCHEME": "xnn-d",
        "ADVPLUGIN_TEMPLATE_KEY_ID": key.key_id, "ADVPLUGIN_TEMPLATE_DIM": "128",
    })  # fmt: skip
    client = example_client_module().AdvpluginClient(server.url, server.api_key)
    prot = protection_of(protector)
    assert client.status()["scheme"] == "xnn-d"
    assert not any((d / "key").exists() for d in (tmp_path, tmp_path / "data"))  # template mode: the server has no key
    names = [str(identity[i]) for i in g_idx]
    client.enroll_templates(names, gallery_t, prot)
    top1 = []
    for s in range(0, len(p_idx), 1000):  # the service takes at most 1,000 per request
        res = client.identify_templates(probe_t[s : s + 1000], prot)["result"]
        top1 += [r["subjects"][0]["subject"] for r in res]
    http = float(np.mean(np.array(top1) == identity[p_idx]))
    print(f"xnn-d templates: HTTP rank-1 {http:.4%}, offline {offline:.4%}")
    assert abs(http - offline) <= 0.001
    assert offline > 0.5


def test_image_mode_identifies_like_offline(face_data, key_file, tmp_path, make_server, request) -> None:
    kpath, _ = key_file
    protector = create_protector("xnn-d", key=load_key(kpath), dim=128)
    url = migrated_database("sqlite", tmp_path, request)
    server = make_server({
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
        "ADVPLUGIN_KEY_FILE": str(kpath), "ADVPLUGIN_SCHEME": "xnn-d",
    })  # fmt: skip
    client = example_client_module().AdvpluginClient(server.url, server.api_key)
    people = ["Aaron_Peirsol", "Abdullah_Gul", "Alejandro_Toledo"]
    extractor = create_extractor("dlib")
    raws, probe_raws = [], []
    for name in people:
        enrol, probe = (face_data / "lfw-dev" / name / f"{name}_{i:04d}.jpg" for i in (1, 2))
        assert len(client.enroll(name, enrol.read_bytes())["templates"]) == 1
        raws.append(extractor.extract(load_image(enrol), largest_only=True).embeddings[0])
        probe_raws.append(extractor.extract(load_image(probe), largest_only=True).embeddings[0])
        top = client.identify(probe.read_bytes(), limit=1)["result"][0]["subjects"][0]["subject"]
        offline_scores = protector.score(
            protector.protect(probe_raws[-1]), protector.protect(np.stack(raws))
        )
        assert top == people[int(np.argmax(offline_scores))]
    server.stop()
    with Gallery.open(url, master_key=env_master_key(), erasure=env_erasure_store()) as g:
        stored = np.concatenate([b.vectors for b in g.iter_templates()])
    np.testing.assert_allclose(stored, protector.protect(np.stack(raws)), atol=1e-5)
    assert max_cosine(stored, np.stack(raws + probe_raws).astype(np.float64)) < 0.5
