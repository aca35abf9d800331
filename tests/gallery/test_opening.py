"""The one opener (`advplugin.gallery.opening.open_gallery`) with plain arguments, as a
library caller uses it; the settings-driven paths (service, `advplugin db`, `migrate`) are
tested through them in tests/service/test_key_layout.py and tests/gallery/test_sealing*.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from advplugin.errors import ConfigurationError
from advplugin.gallery.master_keys import LocalKeyProvider
from advplugin.gallery.opening import MasterKeySource, open_gallery
from advplugin.gallery.sealing import MasterKeyError


def test_a_new_gallery_is_sealed_and_reopened_only_with_its_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    key = LocalKeyProvider.from_file(tmp_path / "k", create=True)
    store = tmp_path / "erasure.db"
    with open_gallery(url, master_key=MasterKeySource.given(key), erasure_store=store, upgrade=True) as g:
        assert g.seal_info().sealed and g.seal_info().unlocked
    assert store.exists()  # made with the seal: new subjects get erasure keys there

    asked: list[bool] = []

    def none(create: bool) -> None:
        asked.append(create)

    with pytest.raises(ConfigurationError, match="ADVPLUGIN_MASTER_KEY") as e:
        open_gallery(url, master_key=MasterKeySource(none, "nowhere.key does not exist"), erasure_store=store)
    assert "nowhere.key does not exist" in str(e.value) and asked == [False]  # never asked to make one

    other = LocalKeyProvider.from_file(tmp_path / "other", create=True)
    with pytest.raises(MasterKeyError, match="wrong master key"):  # a ConfigurationError too
        open_gallery(url, master_key=MasterKeySource.given(other), erasure_store=store)


def test_an_unsealed_gallery_is_left_alone_without_seal_new(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"

    def refuse(create: bool) -> None:
        raise AssertionError("no key may be read or made")

    with open_gallery(url, master_key=MasterKeySource(refuse, "-"), erasure_store=tmp_path / "e.db",
                      upgrade=True, seal_new=False) as g:
        assert not g.seal_info().sealed
    assert not (tmp_path / "e.db").exists()
