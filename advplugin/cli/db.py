"""`advplugin db`: migrate the gallery database, show its state, manage API keys."""

from __future__ import annotations

import argparse

DB_HELP = "SQLAlchemy URL of the gallery (default: $ADVPLUGIN_DATABASE_URL or the data folder's SQLite file)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="gallery database: migrate, status, API keys")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")

    up = dbsub.add_parser("upgrade", help="apply Alembic migrations up to the newest revision")
    up.add_argument("--database-url", help=DB_HELP)
    up.add_argument("--revision", default="head")
    up.set_defaults(func=run_upgrade)

    st = dbsub.add_parser("status", help="schema revision, template counts and provenance")
    st.add_argument("--database-url", help=DB_HELP)
    st.set_defaults(func=run_status)

    ak = dbsub.add_parser("create-api-key", help="create an API key (printed once, stored hashed)")
    ak.add_argument("--database-url", help=DB_HELP)
    ak.add_argument("--collection", default="default")
    ak.add_argument("--name", default="default", help="a label to revoke it by later")
    ak.set_defaults(func=run_create_api_key)

    rk = dbsub.add_parser("revoke-api-key", help="revoke the API keys of a label")
    rk.add_argument("--database-url", help=DB_HELP)
    rk.add_argument("--collection", default="default")
    rk.add_argument("--name", required=True)
    rk.set_defaults(func=run_revoke_api_key)


def _url(args: argparse.Namespace) -> str:
    if args.database_url:
        return args.database_url
    from advplugin.settings import Settings

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings.resolved_database_url


def run_upgrade(args: argparse.Namespace) -> int:
    from advplugin.gallery.schema import current_revision, upgrade
    from advplugin.gallery.store import make_engine

    engine = make_engine(_url(args))
    try:
        before = current_revision(engine)
        upgrade(engine, args.revision)
        after = current_revision(engine)
    finally:
        engine.dispose()
    print(f"database {engine.url.render_as_string(hide_password=True)}: revision {before} -> {after}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from advplugin.gallery import Gallery

    with Gallery.open(_url(args)) as g:
        for name in g.collections():
            print(f"collection {name}: {g.count_subjects(collection=name)} subjects, "
                  f"{g.count_templates(collection=name)} templates")
            for row in g.provenance(collection=name):
                print("  ", ", ".join(f"{k}={v}" for k, v in row.items()))
    return 0


def run_create_api_key(args: argparse.Namespace) -> int:
    from advplugin.gallery import Gallery

    with Gallery.open(_url(args)) as g:
        api_key = g.create_api_key(args.name, collection=args.collection)
    print(api_key)
    return 0


def run_revoke_api_key(args: argparse.Namespace) -> int:
    from advplugin.gallery import Gallery

    with Gallery.open(_url(args)) as g:
        n = g.revoke_api_keys(args.name, collection=args.collection)
    print(f"revoked {n} API key(s) named {args.name!r}")
    return 0
