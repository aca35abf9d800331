"""Subject names in one canonical form on every route (issue 22, items 4 and 5).

A name is stored and looked up as `canonical_name` gives it: NFC, without surrounding
blanks; a name with a control character (newline, tab, ...) is refused with 422. So "é" as
one code point and as "e" + combining accent, and " Ann " and "Ann", are one subject on
both APIs, readable and erasable by any spelling; a newline can no longer make a subject
that no route can address. Galleries from before keep working: the upgrade to revision 0011
plans a rename of each non-canonical name (never merging two subjects), and the service
completes them at its next start.

Template mode (no detector): templates are protected on the client side with an xnn key.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from alembic import command

from advplugin.gallery import Gallery, make_engine
from advplugin.gallery.names import canonical_name, planned_renames
from advplugin.gallery.schema import alembic_config, upgrade
from advplugin.protectors import create_protector
from advplugin.service.state import ServiceState
from advplugin.settings import Settings
from tests.conftest import env_erasure_store, env_master_key
from tests.service.conftest import migrated_database
from tests.service.helpers import protection_of

NFC = unicodedata.normalize("NFC", "Zoë Ångström")
NFD = unicodedata.normalize("NFD", NFC)
CF = "/api/v1/recognition/subjects"


def test_canonical_name() -> None:
    assert NFC != NFD and canonical_name(NFD) == canonical_name(NFC) == NFC
    assert canonical_name("  Ann\u00a0") == "Ann"  # Unicode blanks too
    for bad in ("Ann\nLee", "Ann\tLee", "Ann\rLee", "Ann\u2028Lee", "Ann\x85Lee", "Ann\x00", "   ", ""):
        with pytest.raises(ValueError):
            canonical_name(bad)
    assert canonical_name("Ann Lee-O'Neil (2)") == "Ann Lee-O'Neil (2)"


def test_planned_renames_never_merge() -> None:
    rows = [(1, 1, NFC), (2, 1, NFD), (3, 1, " Ann "), (4, 1, "Line\nBreak"), (5, 2, NFD), (6, 1, "\t")]
    plan = {r["subject_id"]: (r["new_name"], r["collision"]) for r in planned_renames(rows)}
    assert plan == {
        2: (f"{NFC} (subject 2)", True),  # NFC is subject 1's: not merged
        3: ("Ann", False), 4: ("Line Break", False),
        5: (NFC, False),  # another collection: no collision
        6: ("subject 6", False),
    }
    assert all(canonical_name(n) == n for n, _ in plan.values())


@pytest.fixture
def server(tmp_path, key, make_server):  # type: ignore[no-untyped-def]
    url = migrated_database("sqlite", tmp_path, None)  # type: ignore[arg-type]
    return make_server({
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
        "ADVPLUGIN_MODE": "templates", "ADVPLUGIN_SCHEME": "xnn",
        "ADVPLUGIN_TEMPLATE_KEY_ID": key.key_id, "ADVPLUGIN_TEMPLATE_DIM": "128",
    })


def _templates(key, n: int, seed: int = 0) -> list[list[float]]:  # type: ignore[no-untyped-def]
    raw = np.random.default_rng(seed).normal(size=(n, 128)).astype(np.float32)
    return create_protector("xnn", key=key, dim=128).protect(raw).tolist()


def _enrol(c: httpx.Client, key, subject: str, n: int = 1, seed: int = 0) -> httpx.Response:  # type: ignore[no-untyped-def]
    prot = protection_of(create_protector("xnn", key=key, dim=128))
    return c.post("/enroll/templates", json={
        "protection": prot, "items": [{"subject": subject, "template": t} for t in _templates(key, n, seed)]})


def _names(c: httpx.Client) -> list[str]:
    return sorted(s["subject"] for s in c.get("/subjects", params={"size": 100}).json()["subjects"])


def test_control_characters_are_refused_on_every_route(server, key) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        assert _enrol(c, key, "Kept").status_code == 201
        for name in ("Ann\nLee", "Ann\tLee", "Ann\u2028Lee"):
            q = quote(name, safe="")
            answers = {
                "enroll/templates": _enrol(c, key, name),
                "GET /subjects": c.get(f"/subjects/{q}"),
                "DELETE /subjects": c.delete(f"/subjects/{q}"),
                "CF add": c.post(CF, json={"subject": name}),
                "CF rename from": c.put(f"{CF}/{q}", json={"subject": "New"}),
                "CF rename to": c.put(f"{CF}/Kept", json={"subject": name}),
                "CF delete": c.delete(f"{CF}/{q}"),
                "CF faces": c.get("/api/v1/recognition/faces", params={"subject": name}),
                "CF delete faces": c.delete("/api/v1/recognition/faces", params={"subject": name}),
            }
            # Each API family's validation error: native 422, CompreFace 400 (code 26).
            assert {k: r.status_code for k, r in answers.items()} == {
                k: 422 if not k.startswith("CF") else 400 for k in answers}, name
            for r in answers.values():
                assert name not in r.text  # the refused name is not echoed either
        assert _names(c) == ["Kept"]  # nothing made, nothing renamed


def test_twins_and_padded_names_are_one_subject_on_every_route(server, key) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        assert _enrol(c, key, NFC, 1, 1).status_code == 201
        assert _enrol(c, key, NFD, 1, 2).status_code == 201
        assert _enrol(c, key, f"  {NFD} ", 1, 3).status_code == 201
        assert _names(c) == [NFC]
        for spelling in (NFC, NFD, f" {NFC}  "):
            q = quote(spelling, safe="")
            got = c.get(f"/subjects/{q}")
            assert got.status_code == 200 and got.json()["subject"] == NFC and got.json()["template_count"] == 3
            faces = c.get("/api/v1/recognition/faces", params={"subject": spelling}).json()
            assert faces["total_elements"] == 3
        # CompreFace: add (exists already under the other spelling), rename, delete.
        assert c.post(CF, json={"subject": f" {NFD}"}).status_code in (200, 201, 400)
        assert _names(c) == [NFC]
        assert c.put(f"{CF}/{quote(NFD, safe='')}", json={"subject": " Ann "}).json() == {"updated": True}
        assert _names(c) == ["Ann"]
        assert c.put(f"{CF}/{quote(' Ann', safe='')}", json={"subject": NFD}).json() == {"updated": True}
        assert _names(c) == [NFC]
        # Erasable by any spelling: the one subject goes, with all three templates.
        r = c.delete(f"/subjects/{quote(NFD + ' ', safe='')}")
        assert r.status_code == 200 and r.json()["deleted_templates"] == 3
        assert _names(c) == []
        assert _enrol(c, key, "Bo").status_code == 201
        assert c.delete(f"{CF}/{quote(' Bo ', safe='')}").status_code == 200
        assert _names(c) == []


def test_an_older_gallery_is_renamed_to_canonical_names_at_start(tmp_path: Path, key, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """Names stored by an earlier release (no canonical form then): after the upgrade to
    0011 and a start, every subject is readable and erasable by its canonical name, and two
    names that only looked different stay two subjects."""
    url = f"sqlite:///{tmp_path / 'gallery.db'}"
    settings = Settings(data_dir=tmp_path / "data", database_url=url, mode="templates", scheme="xnn",
                        template_key_id=key.key_id)
    Gallery.open(url, upgrade=True).close()
    state = ServiceState.start(settings)
    legacy = {NFC: 1, NFD: 2, " Ann ": 1, "Line\nBreak": 1}
    import advplugin.gallery.templates as templates

    with monkeypatch.context() as m:  # an earlier release stored names as given
        m.setattr(templates, "check_canonical", lambda name: None)
        for seed, (name, n) in enumerate(legacy.items()):
            state.collections.enroll("default", [name] * n, np.asarray(_templates(key, n, seed), np.float32))
    state.close()
    command.downgrade(alembic_config(url), "0010_answer_policy")
    engine = make_engine(url)
    upgrade(engine)  # plans the renames, reports them
    engine.dispose()

    state = ServiceState.start(settings)  # completes them
    try:
        out = capsys.readouterr().out
        assert out.count("to its canonical name") == 3
        g = state.gallery
        collision = next(s.name for s in g.list_subjects() if s.name.startswith(f"{NFC} (subject "))
        counts = {s.name: s.template_count for s in g.list_subjects()}
        assert counts == {NFC: 1, collision: 2, "Ann": 1, "Line Break": 1}
        assert g.subject_renames() == []
        for name in counts:  # readable (re-sealed under the new name) and erasable
            assert len(g.template_rows(g.subject_template_ids(name))) == counts[name]
            assert state.collections.delete_subject("default", name) == counts[name]
        assert g.count_templates(collection=None) == 0
    finally:
        state.close()
    # A second start has nothing left to do.
    ServiceState.start(settings).close()
    assert "canonical name" not in capsys.readouterr().out
    with Gallery.open(url, master_key=env_master_key(), erasure=env_erasure_store()) as g:
        assert g.count_subjects(collection="default") == 0
