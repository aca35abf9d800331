"""Migration fixtures: real SQLite files and real PostgreSQL databases holding the lfw-dev
embeddings (from the shipped cache) the way a team's feature table would."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from advplugin.keys import Key, write_key


class LfwRows:
    """The lfw-dev cache as source rows: ids 1..N, subjects, raw vectors."""

    def __init__(self, cache: dict[str, np.ndarray]) -> None:
        self.vectors = np.asarray(cache["embedding"], np.float32)
        self.subjects = [str(s) for s in cache["identity"]]
        self.ids = list(range(1, len(self.vectors) + 1))

    def __len__(self) -> int:
        return len(self.ids)


@pytest.fixture(scope="session")
def lfw_rows(lfw_cache: dict[str, np.ndarray]) -> LfwRows:
    return LfwRows(lfw_cache)


@pytest.fixture(scope="session")
def new_pg_database(postgres_url: str) -> Iterator[Callable[[], str]]:
    """Makes fresh databases on the test PostgreSQL server (source and gallery kept apart
    from each other and from other test packages); all dropped at the end."""
    base = sa.engine.make_url(postgres_url)
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make() -> str:
        name = f"{base.database}_m{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        made.append(name)
        return base.set(database=name).render_as_string(hide_password=False)

    yield make
    with admin.connect() as conn:
        for name in made:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str, str], str]:
    """`database_url(backend, name)`: a fresh empty database on 'sqlite' or 'postgresql'."""

    def make(backend: str, name: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path / (name + '.db')}"
        return request.getfixturevalue("new_pg_database")()

    return make


def fill_table(
    url: str,
    rows: LfwRows,
    *,
    table: str = "faces",
    vector_format: str = "bytes",
    limit: int | None = None,
) -> None:
    """A team's feature table: id, person, vec (float32 bytes, JSON text or a REAL[] array)."""
    engine = sa.create_engine(url)
    if vector_format == "bytes":
        vec_type: sa.types.TypeEngine = sa.LargeBinary()
    elif vector_format == "json":
        vec_type = sa.Text()
    else:
        from sqlalchemy.dialects.postgresql import ARRAY, REAL

        vec_type = ARRAY(REAL)
    meta = sa.MetaData()
    t = sa.Table(
        table,
        meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("person", sa.String(255), nullable=False),
        sa.Column("vec", vec_type, nullable=True),
    )
    meta.create_all(engine)
    n = limit or len(rows)

    def encode(v: np.ndarray) -> object:
        if vector_format == "bytes":
            return v.astype("<f4").tobytes()
        if vector_format == "json":
            return "[" + ",".join(repr(float(x)) for x in v) + "]"
        return [float(x) for x in v]

    with engine.begin() as conn:
        for start in range(0, n, 2000):
            stop = min(start + 2000, n)
            conn.execute(
                t.insert(),
                [
                    {"id": rows.ids[i], "person": rows.subjects[i], "vec": encode(rows.vectors[i])}
                    for i in range(start, stop)
                ],
            )
    engine.dispose()


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[Path, Path]:
    """Two key files (mode 0600), as `advplugin keygen` makes them."""
    paths = (tmp_path / "k1.key", tmp_path / "k2.key")
    for p in paths:
        write_key(p, Key.generate())
    return paths
