"""Alembic environment of the gallery database; the target metadata is the models' own.

The database URL comes from (first found) the Config attribute `connection` or option
`sqlalchemy.url` set by `advplugin db upgrade`, `-x url=...` on the alembic command line, or
$ADVPLUGIN_DATABASE_URL.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

import advplugin.bulk.models  # noqa: F401  (its tables share the gallery's metadata and history)
from advplugin.gallery.models import Base

# Unconditional on purpose: were the bulk models missing from the metadata, autogenerate
# would propose dropping their tables. `compare_type`: autogenerate also reports changed
# column types (e.g. a longer String), not only added and removed columns.
config = context.config
target_metadata = Base.metadata
_OPTIONS = {"target_metadata": target_metadata, "render_as_batch": True, "compare_type": True}


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or context.get_x_argument(as_dictionary=True).get(
        "url"
    ) or os.environ.get("ADVPLUGIN_DATABASE_URL")
    if not url:
        raise RuntimeError("no database URL: pass -x url=... or set ADVPLUGIN_DATABASE_URL")
    return url


def run_migrations_offline() -> None:
    context.configure(url=_url(), **_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **_OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url())
    with engine.connect() as conn:
        context.configure(connection=conn, **_OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
