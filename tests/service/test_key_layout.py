"""Where the keys live by default, and what start-up does when one is missing (issue 22,
items 6 and 7).

The natural backup unit of a default install is its folder (`.advplugin/`). An earlier
layout kept the master key, the scheme key and the erasure key store in it, beside the
data, so a copy taken before a delete re-opened the deleted subject. The keys now live in
the user's config folder; these tests copy the WHOLE install folder, as an operator's
backup would, and show what it opens, with a control copy that also holds the key folder.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from advplugin.cli.main import main
from advplugin.gallery import Gallery
from advplugin.gallery.erasure import ErasureKeyStore
from advplugin.gallery.master_keys import LocalKeyProvider
from advplugin.gallery.sealing import ErasedError
from advplugin.service.protection import ConfigurationError
from advplugin.service.startup import key_location_warnings
from advplugin.service.state import ServiceState
from advplugin.settings import Settings, default_key_dir
from tests.service.conftest import Server

VICTIM, OTHER = "Victim", "Other"


def _default_env(server: Server) -> Server:
    """Nothing of the test's ADVPLUGIN_* settings but the bootstrap key: embedded defaults."""
    server.env = {k: v for k, v in server.env.items()
                  if not k.startswith("ADVPLUGIN_") or k.startswith("ADVPLUGIN_API_KEY")}
    return server


def _photos(face_data: Path) -> dict[str, list[Path]]:
    people = [p for p in sorted((face_data / "lfw-dev").iterdir()) if len(list(p.glob("*.jpg"))) >= 3]
    return {VICTIM: sorted(people[0].glob("*.jpg"))[:3], OTHER: sorted(people[1].glob("*.jpg"))[:2]}


def _subjects_readable(db: Path, master: LocalKeyProvider, store: ErasureKeyStore) -> dict[str, int | str]:
    """Templates per subject that `master` and `store` open in the gallery file `db`;
    "erased" for a subject whose erasure key is gone."""
    out: dict[str, int | str] = {}
    with Gallery.open(f"sqlite:///{db}", master_key=master, erasure=store) as g:
        for s in g.list_subjects():
            try:
                out[s.name] = len(g.template_rows(g.subject_template_ids(s.name)))
            except ErasedError:
                out[s.name] = "erased"
    return out


def test_a_copy_of_the_default_install_folder_opens_nothing_of_a_deleted_subject(face_data, tmp_path) -> None:
    work = tmp_path / "install"
    work.mkdir()
    server = _default_env(Server(work, {})).start()
    install = work / ".advplugin"
    keys = default_key_dir(install / "data")
    try:
        with server.client() as c:
            for name, files in _photos(face_data).items():
                for f in files:
                    r = c.post("/enroll", data={"subject": name}, files={"file": (f.name, f.read_bytes())})
                    assert r.status_code == 201, r.text
        server.stop()  # a consistent copy (SQLite checkpointed at stop), as a backup tool takes one
        backup = tmp_path / "backup" / ".advplugin"
        shutil.copytree(install, backup)
        control = tmp_path / "control-keys"  # the old layout's backup: the keys went with it
        shutil.copytree(keys, control)
        server.start()
        with server.client() as c:
            assert c.delete(f"/subjects/{VICTIM}").json()["deleted_templates"] == 3
    finally:
        server.stop()

    # The backup holds the gallery (the victim's rows included) and no key of any kind.
    copied = {p.relative_to(backup).as_posix() for p in backup.rglob("*") if p.is_file()}
    assert "data/gallery.db" in copied
    assert not [p for p in copied if p.rsplit("/", 1)[-1] in {"key", "master.key", "erasure-keys.db"}]
    with sqlite3.connect(backup / "data" / "gallery.db") as conn:
        assert conn.execute("SELECT count(*) FROM subjects WHERE name = ?", (VICTIM,)).fetchone() == (1,)
    # Even given the master key (which a backup of the install folder no longer holds), the
    # copy opens the other subject and not the deleted one: its erasure key was only ever in
    # the key folder, and went at the delete.
    master = LocalKeyProvider.from_file(keys / "master.key")
    live = ErasureKeyStore.open(keys / "erasure-keys.db", create=False)
    assert _subjects_readable(backup / "data" / "gallery.db", master, live) == {VICTIM: "erased", OTHER: 2}
    # Control: the same copy with the key folder as it was before the delete (what the earlier
    # layout's backup held) re-opens the victim: the attack works where the keys travel.
    old = ErasureKeyStore.open(control / "erasure-keys.db", create=False)
    assert _subjects_readable(backup / "data" / "gallery.db", master, old) == {VICTIM: 3, OTHER: 2}


@pytest.fixture
def default_layout(monkeypatch, tmp_path) -> Settings:
    """A default-layout gallery (in-process, sealed) with one enrolled subject: its settings."""
    monkeypatch.delenv("ADVPLUGIN_MASTER_KEY_FILE")
    settings = Settings(data_dir=tmp_path / ".advplugin" / "data", scheme="xnn")
    state = ServiceState.start(settings)
    try:
        raw = np.random.default_rng(0).normal(size=(2, 128)).astype(np.float32)
        assert state.protection.protector is not None
        state.collections.enroll("default", [OTHER, OTHER], state.protection.protector.protect(raw))
    finally:
        state.close()
    return settings


def _keys_and_data(settings: Settings) -> set[str]:
    return {str(p) for root in (settings.resolved_key_dir, settings.data_dir) for p in root.rglob("*")}


@pytest.mark.parametrize("lost", ["erasure-keys.db", "key", "master.key"])
def test_a_missing_key_refuses_start_and_makes_nothing(default_layout: Settings, lost: str) -> None:
    settings = default_layout
    (settings.resolved_key_dir / lost).unlink()
    before = _keys_and_data(settings)
    variable = {"erasure-keys.db": "ADVPLUGIN_ERASURE_KEY_STORE", "key": "ADVPLUGIN_KEY_FILE",
                "master.key": "ADVPLUGIN_MASTER_KEY"}[lost]
    with pytest.raises(ConfigurationError, match=variable) as e:
        ServiceState.start(settings)
    assert str(settings.resolved_key_dir / lost) in str(e.value)
    assert _keys_and_data(settings) == before  # no new key, no empty store beside the gallery


def test_keys_beside_the_data_or_in_a_backup_path_are_warned_about(
    default_layout: Settings, capsys, monkeypatch
) -> None:
    settings = default_layout
    assert key_location_warnings(settings) == []
    # An install of an earlier release: its keys in `.advplugin/`, beside the data folder.
    install = settings.data_dir.parent
    for name in ("key", "master.key", "erasure-keys.db"):
        shutil.move(settings.resolved_key_dir / name, install / name)
    assert settings.resolved_master_key_file == install / "master.key"  # still found there
    warnings = key_location_warnings(settings)
    assert len(warnings) == 3 and all(str(install) in w for w in warnings)
    ServiceState.start(settings).close()  # it keeps working, loudly
    out = capsys.readouterr().out
    assert out.count("WARNING") >= 3 and "master key" in out
    monkeypatch.setenv("ADVPLUGIN_DATA_DIR", str(settings.data_dir))
    assert main(["db", "status"]) == 0
    out = capsys.readouterr().out
    assert out.count("WARNING") == 3 and "storage: sealed" in out
    # The new layout with a declared backup path that covers the key folder.
    for name in ("key", "master.key", "erasure-keys.db"):
        shutil.move(install / name, settings.resolved_key_dir / name)
    declared = settings.model_copy(update={"backup_paths": [settings.resolved_key_dir.parent]})
    assert key_location_warnings(settings) == []
    assert any("ADVPLUGIN_BACKUP_PATHS" in w for w in key_location_warnings(declared))
