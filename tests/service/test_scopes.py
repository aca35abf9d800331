"""API-key scopes and the audit trail over real HTTP (uvicorn on 127.0.0.1), on SQLite and
PostgreSQL: an identify-only key is refused (403) wherever the gallery changes, an enrol key
cannot read the audit trail, and every enrolment and deletion leaves exactly one audit row
(who, what, when) in its own transaction; a refused enrolment leaves none, and no row holds
a vector."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import text

from advplugin.cli.db import SCOPES as CLI_SCOPES
from advplugin.cli.main import main
from advplugin.gallery import Gallery, make_engine
from advplugin.gallery.apikeys import SCOPES
from advplugin.protectors import create_protector
from tests.service.conftest import migrated_database
from tests.service.helpers import protection_of, raw_patterns, template_env


def _keys(url: str) -> dict[str, str]:
    """One key per scope, made before the service starts (so it bootstraps none)."""
    with Gallery.open(url) as g:
        return {scope: g.create_api_key(f"{scope}-key", scope=scope) for scope in SCOPES}


def _audit_table(url: str) -> list[tuple]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text("SELECT * FROM audit_events ORDER BY id"))]
    finally:
        engine.dispose()


def _assert_forbidden(r, needed: str, api_key: str) -> None:
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "forbidden"
    assert needed in r.json()["error"]["message"]
    assert api_key not in r.text


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_scopes_and_audit_trail_over_http(backend, key, tmp_path, make_server, request) -> None:
    protector = create_protector("xnn", key=key, dim=128)
    prot = protection_of(protector)
    url = migrated_database(backend, tmp_path, request)
    before = datetime.now(UTC)
    keys = _keys(url)
    server = make_server(template_env(url, tmp_path, key))
    t = protector.protect(np.random.default_rng(1).normal(size=(3, 128)).astype(np.float32))
    items = [{"subject": n, "template": v.tolist()} for n, v in zip(["Ann", "Ann", "Bob"], t, strict=True)]

    with server.client(keys["identify"]) as c:
        ident = keys["identify"]
        _assert_forbidden(c.post("/enroll/templates", json={"protection": prot, "items": items}), "enrol", ident)
        _assert_forbidden(c.post("/enroll", files={"file": ("a.jpg", b"x")}, data={"subject": "Ann"}), "enrol", ident)
        _assert_forbidden(c.delete("/subjects/Ann"), "enrol", ident)
        _assert_forbidden(c.get("/audit"), "admin", ident)
        assert c.post("/identify/templates", json={"protection": prot, "templates": t[:1].tolist()}).status_code == 200
        assert c.get("/subjects").status_code == 200 and c.get("/status").status_code == 200

    with server.client(keys["enrol"]) as c:
        assert c.post("/enroll/templates", json={"protection": prot, "items": items}).status_code == 201
        # A refused enrolment (422: wrong dimension) writes neither templates nor an event.
        bad = [{"subject": "Cy", "template": [0.5] * 64}]
        assert c.post("/enroll/templates", json={"protection": prot, "items": bad}).status_code == 422
        assert c.delete("/subjects/Bob").json() == {"subject": "Bob", "deleted_templates": 1}
        assert c.delete("/subjects/Nobody").status_code == 404  # nothing deleted: no event
        _assert_forbidden(c.get("/audit"), "admin", keys["enrol"])

    with Gallery.open(url) as g:
        ids = {k.name: k.id for k in g.list_api_keys()}
    with server.client(keys["admin"]) as c:
        page = c.get("/audit", params={"page": 0, "size": 100}).json()
        assert c.get("/audit", params={"page": 1, "size": 3}).json()["events"] == page["events"][3:6]
    after = datetime.now(UTC)
    got = [(e["actor"], e["api_key_id"], e["action"], e["subject"], e["template_count"]) for e in page["events"]]
    enrol_id = ids["enrol-key"]
    assert got == [
        ("cli", None, "create_api_key", "identify-key (identify)", None),
        ("cli", None, "create_api_key", "enrol-key (enrol)", None),
        ("cli", None, "create_api_key", "admin-key (admin)", None),
        ("api-key", enrol_id, "enroll", "Ann", 2),
        ("api-key", enrol_id, "enroll", "Bob", 1),
        ("api-key", enrol_id, "delete_subject", "Bob", 1),
    ]
    assert page["total"] == len(got)
    for e in page["events"]:
        when = datetime.fromisoformat(e["created_at"])
        assert when.tzinfo is not None and before <= when <= after

    # The rows themselves: no vector (protected or not), in any rendering, in any column.
    rows = _audit_table(url)
    assert len(rows) == len(got)
    blob = repr(rows).encode() + b"".join(v for r in rows for v in r if isinstance(v, bytes))
    assert not any(isinstance(v, bytes | memoryview) for r in rows for v in r)
    for v in t:
        for pat in raw_patterns(v):
            assert pat not in blob
    assert keys["enrol"].encode() not in blob


def test_identify_only_key_refused_on_image_enroll(face_data, key_file, tmp_path, make_server) -> None:
    """Images mode: the identify key gets 403 on /enroll with a real face and 200 on /identify."""
    kpath, _ = key_file
    url = migrated_database("sqlite", tmp_path, None)  # type: ignore[arg-type]
    keys = _keys(url)
    server = make_server({
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
        "ADVPLUGIN_KEY_FILE": str(kpath), "ADVPLUGIN_SCHEME": "xnn",
    })
    face = sorted((face_data / "lfw-dev" / "Aaron_Peirsol").glob("*.jpg"))[0].read_bytes()
    with server.client(keys["identify"]) as c:
        r = c.post("/enroll", files={"file": ("a.jpg", face)}, data={"subject": "Aaron"})
        _assert_forbidden(r, "enrol", keys["identify"])
        assert c.post("/identify", files={"file": ("a.jpg", face)}).status_code == 200
    with server.client(keys["enrol"]) as c:
        assert c.post("/enroll", files={"file": ("a.jpg", face)}, data={"subject": "Aaron"}).status_code == 201
    with Gallery.open(url) as g:
        last = g.audit_events()[-1]
        enrol_id = next(k.id for k in g.list_api_keys() if k.scope == "enrol")
    assert (last.action, last.subject, last.template_count, last.api_key_id) == ("enroll", "Aaron", 1, enrol_id)


def test_cli_api_key_create_list_revoke_and_audit(tmp_path, capsys) -> None:
    assert CLI_SCOPES == SCOPES  # the CLI's copy (kept import-free) must not drift
    url = f"sqlite:///{tmp_path / 'g.db'}"
    assert main(["db", "upgrade", "--database-url", url]) == 0
    assert main(["db", "api-key", "create", "--database-url", url, "--scope", "identify",
                 "--collection", "C", "--name", "N"]) == 0
    assert main(["db", "create-api-key", "--database-url", url, "--name", "old"]) == 0  # the alias
    out = capsys.readouterr().out.split()
    new_key, old_key = out[-2], out[-1]
    with Gallery.open(url) as g:
        scopes = {(k.collection, k.name): k.scope for k in g.list_api_keys()}
        hashes = [k.key_sha256 for k in g.active_api_keys()]
    assert scopes == {("C", "N"): "identify", ("default", "old"): "admin"}
    assert main(["db", "api-key", "list", "--database-url", url]) == 0
    listing = capsys.readouterr().out
    assert "name=N scope=identify" in listing and "name=old scope=admin" in listing
    assert new_key not in listing and old_key not in listing and not any(h in listing for h in hashes)
    assert main(["db", "api-key", "revoke", "--database-url", url, "--collection", "C", "--name", "N"]) == 0
    assert main(["db", "api-key", "list", "--database-url", url, "--collection", "C"]) == 0
    assert "revoked 20" in capsys.readouterr().out
    assert main(["db", "audit", "--database-url", url, "--collection", "C"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" ", 4)[3:] for ln in lines] == [
        ["by=cli", "create_api_key subject='N (identify)'"], ["by=cli", "revoke_api_key subject='N'"]]
    with pytest.raises(SystemExit):
        main(["db", "api-key", "create", "--database-url", url, "--scope", "root"])
