"""Alembic migrations of the gallery database, used programmatically.

`advplugin db upgrade` and the tests call `upgrade`; the service and `Gallery.open` call
`check_migrated`, which refuses a database that is not at the newest revision with a message
that says what to run (instead of failing later on a missing column).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

import advplugin.migrations
from advplugin.errors import ConfigurationError

MIGRATIONS_DIR = Path(advplugin.migrations.__file__).resolve().parent


class NotMigratedError(ConfigurationError):
    """The database schema is missing or older than this version of advplugin."""


def alembic_config(url: str | None = None) -> Config:
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a '%' in a password must be doubled.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision` on the engine's database (idempotent), in one
    transaction.

    SQLite: with foreign keys off for the migration (a revision that rebuilds a table in
    batch mode drops the old one, which with foreign keys on would cascade-delete the rows
    that reference it), checked with `PRAGMA foreign_key_check` before the commit. SQLite
    ignores that pragma inside a transaction, so it is set on the driver's connection
    before SQLAlchemy begins one, and set back afterwards for the connection pool.
    """
    cfg = alembic_config()
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        fk_before = _sqlite_foreign_keys(conn, on=False) if sqlite else False
        try:
            with conn.begin():
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(
                            f"migration left {len(broken)} rows with a dangling foreign key "
                            f"(first: table {broken[0][0]}); rolled back"
                        )
        finally:
            if sqlite:
                _sqlite_foreign_keys(conn, on=fk_before)


def _sqlite_foreign_keys(conn: Connection, *, on: bool) -> bool:
    """Set SQLite's foreign-key enforcement on the driver connection (outside any
    transaction); returns the previous setting."""
    driver = conn.connection.driver_connection
    assert driver is not None
    before = bool(driver.execute("PRAGMA foreign_keys").fetchone()[0])
    driver.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    return before


def check_migrated(engine: Engine) -> None:
    current, head = current_revision(engine), head_revision()
    if current != head:
        url = engine.url.render_as_string(hide_password=True)
        state = "has no advplugin schema" if current is None else f"is at revision {current}"
        raise NotMigratedError(
            f"database {url} {state}, this advplugin needs revision {head}; "
            f"run `advplugin db upgrade --database-url '{url}'` first"
        )
