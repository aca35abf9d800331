"""The official CompreFace Python SDK (0.6.0) against a live advplugin over real HTTP.

A small lfw-dev subset (real JPEGs, real dlib in the server) is enrolled through the SDK; every
probe is recognised through the SDK and through the native /identify of the same server: the
rank-1 answers must be the same, probe by probe, with the same similarities. Then the SDK runs
the rest of its call set (verify by image id, detection, verification service, subjects CRUD,
deletes) and each answer is checked against what the gallery holds afterwards.

All of it under the default answer policy (docs/service.md, "What an answer reveals"): the key
is an ordinary one, so recognitions name the match only, with a band value as `similarity`.
"""

from __future__ import annotations

import numpy as np
import pytest

from advplugin.embedding_files import load_embedding_set
from advplugin.service.answers import BAND_VALUES
from tests.compreface.conftest import run_sdk
from tests.service.conftest import migrated_database
from tests.service.helpers import first_vs_rest


@pytest.fixture(scope="module")
def subset(face_data):
    """6 identities with >= 2 images: the first image of each enrolled, up to 2 others probed."""
    cache = load_embedding_set(face_data / "lfw-dev-dlib128.npz")
    g_idx, p_idx = first_vs_rest(cache.identity, cache.path, max_identities=6, max_images=3)
    root = face_data / "lfw-dev"
    gallery = [(str(cache.identity[i]), str(root / str(cache.path[i]))) for i in g_idx]
    probes = [(str(cache.identity[i]), str(root / str(cache.path[i]))) for i in p_idx]
    return gallery, probes


@pytest.mark.slow
def test_sdk_call_set_matches_native_api(subset, sdk_python, key_file, tmp_path, make_server, request) -> None:
    gallery, probes = subset
    kpath, _ = key_file
    url = migrated_database("sqlite", tmp_path, request)
    server = make_server({
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
        "ADVPLUGIN_KEY_FILE": str(kpath), "ADVPLUGIN_SCHEME": "xnn",
        "ADVPLUGIN_API_KEY_EXACT_SCORES": "false",  # the default policy: decisions, not measurements
    })
    names = [n for n, _ in gallery]
    same_name = probes[0][0]
    config = {
        "port": server.port, "api_key": server.api_key, "gallery": gallery, "probes": [p for _, p in probes],
        "verify": {"probe": probes[0][1], "gallery_index": names.index(same_name),
                   "other_index": (names.index(same_name) + 1) % len(names)},
    }
    out = run_sdk(sdk_python, "enroll", config, tmp_path)

    # -- add (file path, bytes, base64) and list ---------------------------------------------------
    assert [a["subject"] for a in out["added"]] == names
    image_ids = [a["image_id"] for a in out["added"]]
    assert out["add_base64"]["status"] == 201 and out["add_base64"]["body"]["subject"] == names[0]
    listed = out["list"]
    assert listed["total_elements"] == len(gallery) + 1 == len(listed["faces"])
    assert {f["image_id"] for f in listed["faces"]} == {*image_ids, out["add_base64"]["body"]["image_id"]}
    assert all(set(f) == {"image_id", "subject"} for f in listed["faces"])

    # -- recognize: the same rank-1 as the native /identify, probe by probe ------------------------
    client = server.client()
    sdk_top, native_top = [], []
    for (_, path), res in zip(probes, out["recognize"], strict=True):
        with open(path, "rb") as f:
            r = client.post("/identify", params={"limit": 1, "prediction_count": 2}, files={"file": f})
        if r.status_code == 422 and r.json()["error"]["code"] == "no_face":  # dlib finds no face
            assert res["code"] == 28, res  # CompreFace's "no face is found", the same decision
            sdk_top.append({"subject": None, "similarity": 0.0})
            native_top.append({"subject": None, "similarity": 0.0})
            continue
        assert r.status_code == 200, r.text
        assert "result" in res, res
        assert "embedding" not in res["result"][0]
        # prediction_count=2 asked; an ordinary key is told the match only (max_predictions 1)
        assert len(res["result"]) == 1 and len(res["result"][0]["subjects"]) <= 1
        none = {"subject": None, "similarity": 0.0}
        sdk_top.append((res["result"][0]["subjects"] or [none])[0])
        native_top.append((r.json()["result"][0]["subjects"] or [none])[0])
    assert [s["subject"] for s in sdk_top] == [s["subject"] for s in native_top]
    assert {s["similarity"] for s in sdk_top} <= {0.0, *BAND_VALUES.values()}  # bands, not measurements
    np.testing.assert_allclose([s["similarity"] for s in sdk_top], [s["similarity"] for s in native_top],
                               atol=1e-6)
    truth = [n for n, _ in probes]
    sdk_rank1 = float(np.mean([s["subject"] == t for s, t in zip(sdk_top, truth, strict=True)]))
    native_rank1 = float(np.mean([s["subject"] == t for s, t in zip(native_top, truth, strict=True)]))
    print(f"compreface SDK: {len(gallery)} enrolled, {len(probes)} probes: SDK rank-1 {sdk_rank1:.2%}, "
          f"native /identify rank-1 {native_rank1:.2%}")
    assert sdk_rank1 == native_rank1
    assert sdk_rank1 > 0.5  # a real recogniser, not chance

    # -- verify by image id, detection, verification service ---------------------------------------
    same = out["verify_same"]["result"][0]["similarity"]
    other = out["verify_other"]["result"][0]["similarity"]
    assert same in BAND_VALUES.values() and other == 0.0  # the decision as a band; 0.0: not the person
    box = out["detect"]["result"][0]["box"]
    assert set(box) == {"probability", "x_max", "y_max", "x_min", "y_min"} and box["x_max"] > box["x_min"]
    v_same = out["verification_same"]["result"][0]["face_matches"][0]["similarity"]
    v_other = out["verification_other"]["result"][0]["face_matches"][0]["similarity"]
    assert v_same > v_other
    assert abs(v_same - same) < 1e-5  # one enrolled example: the same comparison either way
    assert "plugins_versions" in out["status_option"] and "execution_time" in out["status_option"]["result"][0]

    # -- subjects and deletes -----------------------------------------------------------------------
    renamed_from = names[-1]  # not names[0]: renaming re-enrols, which gives new image ids
    probe_of_renamed = next(p for n, p in probes if n == renamed_from)
    b64_id = out["add_base64"]["body"]["image_id"]
    others = names[1:4]
    manage = {
        "new_subject": "Someone_New", "existing": renamed_from, "renamed": "Renamed_Person",
        "probe_of_existing": probe_of_renamed, "delete_image_id": b64_id,
        "delete_many": [image_ids[1], "00000000-0000-0000-0000-000000000000"],
        "delete_examples_of": others[1], "delete_subject": others[2],
    }
    m = run_sdk(sdk_python, "manage", {**config, "manage": manage}, tmp_path)
    assert sorted(m["subjects_before"]["subjects"]) == sorted(names)
    assert m["subject_add"] == {"subject": "Someone_New"}
    assert m["subject_add_again"]["code"] == 43  # CompreFace's "subject already exists"
    assert m["rename"] == {"updated": True}
    before = native_top[[p for _, p in probes].index(probe_of_renamed)]["subject"]
    expected = "Renamed_Person" if before == renamed_from else before
    renamed_top = m["recognize_renamed"]["result"][0]["subjects"]
    assert (renamed_top[0]["subject"] if renamed_top else None) == expected
    assert renamed_from not in m["subjects_after_rename"]["subjects"]
    assert "Renamed_Person" in m["subjects_after_rename"]["subjects"]
    assert "Someone_New" in m["subjects_after_rename"]["subjects"]  # a subject without examples
    assert m["delete_by_id"] == {"image_id": b64_id, "subject": names[0]}
    assert m["delete_by_id_again"]["code"] == 11
    assert m["delete_many"]["status"] == 200
    assert [d["image_id"] for d in m["delete_many"]["body"]] == [manage["delete_many"][0]]
    assert m["delete_all_of_subject"] == {"deleted": 1}
    left = {f["subject"] for f in m["list_after_deletes"]["faces"]}
    assert others[0] not in left and others[1] not in left and others[2] in left
    assert m["subject_delete"] == {"subject": others[2]}
    assert m["subject_delete_missing"]["code"] == 42
    assert m["calculator"]["code"] == 36 and "embedding" in m["calculator"]["message"]
    assert "not keep" in m["download"]["message"]
    assert m["wrong_key"]["code"] == 20 and "not-a-key" not in str(m["wrong_key"])
    assert m["subjects_delete_all"]["deleted"] >= 1
    assert m["subjects_final"] == {"subjects": []}
    assert m["list_final"]["total_elements"] == 0
    # the native API sees the same gallery: nothing left
    assert client.get("/subjects").json()["total"] == 0
