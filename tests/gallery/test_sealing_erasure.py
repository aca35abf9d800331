"""Erasure stays erasure (sealed storage), through the real service over HTTP on SQLite and
PostgreSQL: after DELETE /subjects, after kill -9 and after a restart, the files hold no
plaintext template, SQLite's files (database, WAL, snapshot) not even the ciphertext or the
subject's key; and a copy of the database taken BEFORE the delete opens nothing of the
subject, with the unchanged master key: its erasure key, held outside the database, was
shredded by the delete (crypto-shredding, for copies the delete cannot reach). Rotating the
keys (`advplugin db rewrap --new-master-key --new-data-key`) then retires the whole copy.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy import text

from advplugin.cli.main import main
from advplugin.gallery import Gallery, make_engine
from advplugin.gallery.master_keys import LocalKeyProvider
from advplugin.gallery.sealing import ErasedError, MasterKeyError, TamperedError
from advplugin.protectors import create_protector
from tests.conftest import env_erasure_store
from tests.service.conftest import Server, migrated_database
from tests.service.helpers import protection_of

NAMES = ["Victim", "Victim", "Bob", "Cy", "Dee"]


def _env(url: str, tmp_path: Path, key) -> dict[str, str]:
    return {
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
        "ADVPLUGIN_MODE": "templates", "ADVPLUGIN_SCHEME": "xnn",
        "ADVPLUGIN_TEMPLATE_KEY_ID": key.key_id, "ADVPLUGIN_TEMPLATE_DIM": "128",
    }


def _victim_secrets(url: str) -> tuple[list[bytes], bytes]:
    """(the victim's stored template ciphertexts, its sealed subject key), read as a thief would."""
    engine = make_engine(url)
    with engine.connect() as conn:
        cts = [bytes(v) for (v,) in conn.execute(text(
            "SELECT t.vector FROM templates t JOIN subjects s ON s.id = t.subject_id WHERE s.name = 'Victim'"))]
        sk = bytes(conn.scalar(text("SELECT sealed_key FROM subjects WHERE name = 'Victim'")))
    engine.dispose()
    return cts, sk


def _pg_files(url: str) -> list[Path]:
    """The heap files of `templates` and `subjects` (after a CHECKPOINT) and the newest WAL
    segments: this test runs as a user that can read the cluster's data directory."""
    engine = make_engine(url)
    with engine.connect() as conn:
        conn.exec_driver_sql("CHECKPOINT")
        base = Path(conn.exec_driver_sql("SHOW data_directory").scalar())
        rels = [conn.scalar(text("SELECT pg_relation_filepath(:t)"), {"t": t}) for t in ("templates", "subjects")]
    engine.dispose()
    if not base.is_dir():
        pytest.skip(f"PostgreSQL data directory {base} is not readable here")
    wal = sorted((base / "pg_wal").glob("0*"), key=lambda p: p.stat().st_mtime)[-2:]
    return [base / r for r in rels] + wal


def _scan(files: list[Path], needles: dict[str, bytes]) -> dict[str, list[str]]:
    """{what: [files it was found in]} for every needle found anywhere."""
    found: dict[str, list[str]] = {}
    for f in files:
        if not f.exists():
            continue
        data = f.read_bytes()
        for what, needle in needles.items():
            if needle in data:
                found.setdefault(what, []).append(f.name)
    return found


def _copy_database(backend: str, url: str, tmp_path: Path, request) -> str:
    """A copy of the database as a backup would take it: SQLite's backup API, pg_dump."""
    if backend == "sqlite":
        src = make_engine(url).url.database
        with sqlite3.connect(src) as a, sqlite3.connect(tmp_path / "backup.db") as b:
            a.backup(b)
        return f"sqlite:///{tmp_path / 'backup.db'}"
    if shutil.which("pg_dump") is None or shutil.which("psql") is None:
        pytest.skip("pg_dump/psql not installed")
    src = sa.engine.make_url(url)
    dump = tmp_path / "backup.sql"
    conn_args = ["-h", src.host or "127.0.0.1", "-p", str(src.port or 5432), "-U", src.username or "postgres"]
    subprocess.run(["pg_dump", *conn_args, "-d", src.database, "-f", str(dump)], check=True, timeout=120)
    name = f"{src.database}_bk"
    admin = sa.create_engine(src, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    request.addfinalizer(lambda: _drop(src, name))
    subprocess.run(["psql", *conn_args, "-q", "-d", name, "-f", str(dump)], check=True, timeout=120,
                   capture_output=True)
    return src.set(database=name).render_as_string(hide_password=False)


def _drop(src: sa.engine.URL, name: str) -> None:
    admin = sa.create_engine(src, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_deleted_subject_is_gone_from_files_and_shredded_in_copies(
    backend, key, tmp_path, request, master_key_file
) -> None:
    protector = create_protector("xnn", key=key, dim=128)
    prot = protection_of(protector)
    url = migrated_database(backend, tmp_path, request)
    t = protector.protect(np.random.default_rng(0).normal(size=(len(NAMES), 128)).astype(np.float32))
    server = Server(tmp_path, _env(url, tmp_path, key)).start()
    try:
        with server.client() as c:
            r = c.post("/enroll/templates", json={"protection": prot, "items": [
                {"subject": n, "template": v.tolist()} for n, v in zip(NAMES, t, strict=True)]})
            assert r.status_code == 201, r.text
        server.restart()  # the snapshot now holds the victim (sealed)
        snapshots = sorted((tmp_path / "data" / "index").glob("*.npz"))
        assert snapshots
        cts, subject_key = _victim_secrets(url)
        unit = t[:2] / np.linalg.norm(t[:2], axis=1, keepdims=True)
        needles = {f"ciphertext {i}": ct[12:60] for i, ct in enumerate(cts)}  # past the nonce
        needles["subject key"] = subject_key[16:48]
        plain = {f"plaintext {i}": v.astype("<f4").tobytes()[:32] for i, v in enumerate([*t[:2], *unit])}
        files = (
            [Path(make_engine(url).url.database + s) for s in ("", "-wal")] + snapshots
            if backend == "sqlite" else _pg_files(url) + snapshots
        )
        # Control: before the delete, the scan does find the victim's ciphertext where it is.
        before = _scan(files, needles)
        assert before and not _scan(files, plain)
        backup_url = _copy_database(backend, url, tmp_path, request)

        with server.client() as c:
            assert c.delete("/subjects/Victim").status_code == 200
        for moment in ("after the delete", "after kill -9", "after a restart"):
            if moment == "after kill -9":
                server.kill()
            elif moment == "after a restart":
                server.start()
            files_now = files if backend == "sqlite" else _pg_files(url) + snapshots
            assert not _scan(files_now, plain), moment  # sealed: never any plaintext
            if backend == "sqlite":
                assert not _scan(files_now, needles), moment  # secure_delete + checkpoint + snapshot
    finally:
        server.stop()

    # The copy taken before the delete holds the victim's rows, and the master key has not
    # changed, yet they open nothing: the victim's erasure key left the store at the delete.
    old_master = LocalKeyProvider.from_file(master_key_file)
    erasure = env_erasure_store()
    with Gallery.open(backup_url, master_key=old_master, erasure=erasure) as g:
        assert "Victim" in {s.name for s in g.list_subjects()}
        sealer = g.snapshot_sealer()
        assert sealer is not None
        with pytest.raises(ErasedError, match="Victim"):
            sealer.subject_cipher(g.collection_id(), "Victim", subject_key)
        with pytest.raises(ErasedError, match="Victim"):
            list(g.iter_templates())
        assert sorted(name for _, name in g.purge_erased()) == ["Victim"]
        assert sorted(s for b in g.iter_templates() for s in b.subjects) == sorted(NAMES[2:])  # the rest reads
    # Rotating the keys and destroying the old master key retires the copy as a whole.
    new_key = tmp_path / "new-master.key"
    assert main(["db", "rewrap", "--database-url", url, "--new-master-key", str(new_key), "--new-data-key"]) == 0
    master_key_file.unlink()
    new_master = LocalKeyProvider.from_file(new_key)
    with pytest.raises(MasterKeyError):
        Gallery.open(backup_url, master_key=new_master)
    with Gallery.open(url, master_key=new_master, erasure=env_erasure_store()) as g:
        remaining = [s for b in g.iter_templates() for s in b.subjects]
        assert remaining == NAMES[2:]  # everyone else reads, with the new keys
        sealer = g.snapshot_sealer()
        assert sealer is not None
        with pytest.raises(TamperedError):  # the copy's subject key: under a data key gone everywhere
            sealer.subject_cipher(g.collection_id(), "Victim", subject_key)
