"""Gallery fixtures: one migrated gallery per backend (SQLite file, real PostgreSQL), sealed
as new galleries are by default (a master key file beside the test's folder)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from advplugin.gallery import Gallery, make_engine
from advplugin.gallery.erasure import ErasureKeyStore
from advplugin.gallery.master_keys import LocalKeyProvider


def _empty_postgres(url: str) -> None:
    """Drop everything in the per-session database so each test starts from nothing."""
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def gallery_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gallery.db'}"
    url = request.getfixturevalue("postgres_url")
    _empty_postgres(url)
    return url


@pytest.fixture
def master_key(tmp_path: Path) -> LocalKeyProvider:
    """A master key file (0600, created as the service creates it)."""
    return LocalKeyProvider.from_file(tmp_path / "master.key", create=True)


@pytest.fixture
def erasure(tmp_path: Path) -> ErasureKeyStore:
    """The erasure key store beside the master key (where the service keeps it by default)."""
    return ErasureKeyStore.open(tmp_path / "erasure-keys.db")


@pytest.fixture
def gallery(gallery_url: str, master_key: LocalKeyProvider, erasure: ErasureKeyStore) -> Iterator[Gallery]:
    g = Gallery.open(gallery_url, upgrade=True, master_key=master_key, erasure=erasure)
    yield g
    g.close()
