"""Shared fixtures. Tests mirror the package layout (tests/protectors, tests/adapters, ...).

Face data comes from $ADVPLUGIN_FACE_DATA (default ../shared/data), shared models from
$ADVPLUGIN_MODELS_DIR (default: `models/` beside the face data). Where they are absent, the
fixtures skip the test with a reason; tests that need no data still run.
PostgreSQL: `postgres_url` creates a fresh database per test session on the server at
$ADVPLUGIN_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test) and
drops it afterwards, so concurrent runs never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from advplugin.gallery.erasure import ErasureKeyStore
from advplugin.gallery.master_keys import LocalKeyProvider
from advplugin.keys import Key

REPO = Path(__file__).resolve().parents[1]
FACE_DATA = Path(os.environ.get("ADVPLUGIN_FACE_DATA", REPO.parent / "shared" / "data"))
#: Shared recognition models (mobileface.onnx): beside the face data unless told otherwise.
SHARED_MODELS = Path(os.environ.get("ADVPLUGIN_MODELS_DIR", FACE_DATA.parent / "models"))
POSTGRES_URL = os.environ.get(
    "ADVPLUGIN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def face_data() -> Path:
    """The LFW folder (holding lfw-dev/, lfw-dev-pairs.txt, lfw-dev-dlib128.npz)."""
    if not (FACE_DATA / "lfw-dev").is_dir():
        pytest.skip(f"face data not found at {FACE_DATA} (set ADVPLUGIN_FACE_DATA)")
    return FACE_DATA


@pytest.fixture(scope="session")
def lfw_cache(face_data: Path) -> dict[str, np.ndarray]:
    """The shipped dlib embeddings of lfw-dev (a cache; tests also recompute some)."""
    with np.load(face_data / "lfw-dev-dlib128.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture
def key() -> Key:
    return Key.generate()


@pytest.fixture(scope="session", autouse=True)
def config_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's own config folder (XDG_CONFIG_HOME), apart from every test's tmp_path:
    the default key folders of the galleries tests make lie there
    (`advplugin.settings.default_key_dir`, one per data folder), never in the user's
    ~/.config. Session-wide, so services started by module fixtures inherit it too."""
    path = tmp_path_factory.mktemp("config")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(path))
        for name in ("ADVPLUGIN_KEY_DIR", "ADVPLUGIN_KEY_FILE", "ADVPLUGIN_ERASURE_KEY_STORE", "ADVPLUGIN_BACKUP_PATHS"):
            mp.delenv(name, raising=False)
        yield path


@pytest.fixture(autouse=True)
def master_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Sealed storage: each test's own master key file (ADVPLUGIN_MASTER_KEY_FILE), so the
    services and CLI commands a test starts seal new galleries with it (never with a file
    in the repository's .advplugin/), and the test can open them with `env_master_key()`."""
    path = tmp_path / "master.key"
    monkeypatch.setenv("ADVPLUGIN_MASTER_KEY_FILE", str(path))
    monkeypatch.delenv("ADVPLUGIN_MASTER_KEY", raising=False)
    return path


def env_master_key() -> LocalKeyProvider:
    """The master key the current test's services and commands use (created if missing)."""
    return LocalKeyProvider.from_file(os.environ["ADVPLUGIN_MASTER_KEY_FILE"], create=True)


def env_erasure_store() -> ErasureKeyStore:
    """The erasure key store the current test's services and commands use: the default,
    beside the master key file."""
    return ErasureKeyStore.open(Path(os.environ["ADVPLUGIN_MASTER_KEY_FILE"]).parent / "erasure-keys.db")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (dropped at the end)."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"advplugin_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except Exception as e:  # pragma: no cover - environment problem, reported clearly
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not usable: {e}")
    url = sqlalchemy.engine.make_url(POSTGRES_URL).set(database=name)
    yield url.render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()
