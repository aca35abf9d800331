"""Key files: owner-only, never overwritten by accident, never printed."""

from __future__ import annotations

import os
import stat

import pytest

from advplugin.keys import Key, load_key, write_key


def test_key_file_is_owner_only_and_round_trips(tmp_path) -> None:
    key = write_key(tmp_path / "k.key")
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    assert load_key(tmp_path / "k.key") == key


def test_key_file_is_owner_only_even_with_a_permissive_umask(tmp_path) -> None:
    old = os.umask(0)
    try:
        write_key(tmp_path / "k.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600


def test_existing_key_is_not_overwritten(tmp_path) -> None:
    key = write_key(tmp_path / "k.key")
    with pytest.raises(FileExistsError, match="refusing"):
        write_key(tmp_path / "k.key")
    assert load_key(tmp_path / "k.key") == key


def test_group_readable_key_is_refused(tmp_path) -> None:
    write_key(tmp_path / "k.key")
    os.chmod(tmp_path / "k.key", 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_key(tmp_path / "k.key")


@pytest.mark.parametrize("content", ["", "hello", "advplugin-key-v1:!!!", "advplugin-key-v1:AAAA"])
def test_bad_key_files(tmp_path, content: str) -> None:
    path = tmp_path / "k.key"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(ValueError):
        load_key(path)


def test_missing_key_file_says_how_to_create_one(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="keygen"):
        load_key(tmp_path / "nope.key")


def test_key_id_identifies_without_revealing() -> None:
    a, b = Key.generate(), Key.generate()
    assert a.key_id != b.key_id and a.key_id == Key(a.secret).key_id
    for text in (repr(a), str(a), a.key_id):
        assert a.secret.hex() not in text
    assert a.derive("x", 32) != a.derive("y", 32) != b.derive("x", 32)
