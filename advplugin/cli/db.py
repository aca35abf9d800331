"""`advplugin db`: migrate the gallery database, show its state, manage API keys, seal it.

API keys: `db api-key create --scope identify|enrol|admin` (printed once, stored hashed),
`db api-key list` (names, scopes, dates; never hashes), `db api-key revoke`, `db api-key set`
(exact scores, answer budgets: docs/service.md, "What an answer reveals"); `db collection set
--fmr` (a collection's operating point); the older
`db create-api-key` / `db revoke-api-key` still work (admin keys). `db audit` prints the
audit trail (enrolments, deletions, key operations: who, what, when).

Sealed storage (docs/sealed-storage.md): `db seal` converts an unsealed gallery in place
(chunked, resumable), `db rewrap --new-master-key FILE` moves the gallery's data keys to a
new master key in one transaction (rows untouched), and with `--new-data-key` also moves
every subject key to a new gallery data key (resumable), after which a copy of the database
taken before, and the old master key, open nothing of it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from advplugin.gallery.erasure import ErasureKeyStore
    from advplugin.gallery.master_keys import KeyProvider

#: Mirrors `advplugin.gallery.apikeys.SCOPES` (not imported: the CLI parser loads nothing heavy).
SCOPES = ("identify", "enrol", "admin")
SCOPE_HELP = "identify: identify/verify/read; enrol: also enrol and delete; admin: also the audit trail"
DB_HELP = "SQLAlchemy URL of the gallery (default: $ADVPLUGIN_DATABASE_URL or the data folder's SQLite file)"
MASTER_HELP = (
    "master key file (default: $ADVPLUGIN_MASTER_KEY_FILE, $ADVPLUGIN_MASTER_KEY, or "
    "master.key beside the data folder)"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="gallery database: migrate, status, API keys, sealing")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")

    up = dbsub.add_parser("upgrade", help="apply Alembic migrations up to the newest revision")
    up.add_argument("--database-url", help=DB_HELP)
    up.add_argument("--revision", default="head")
    up.set_defaults(func=run_upgrade)

    st = dbsub.add_parser("status", help="schema revision, sealing, template counts and provenance")
    st.add_argument("--database-url", help=DB_HELP)
    st.set_defaults(func=run_status)

    ak = dbsub.add_parser("create-api-key", help="create an API key (printed once, stored hashed)")
    ak.add_argument("--database-url", help=DB_HELP)
    ak.add_argument("--collection", default="default")
    ak.add_argument("--name", default="default", help="a label to revoke it by later")
    ak.add_argument("--scope", choices=SCOPES, default="admin", help=SCOPE_HELP)
    ak.set_defaults(func=run_create_api_key)

    keys = dbsub.add_parser("api-key", help="API keys with scopes: create, list, revoke")
    keysub = keys.add_subparsers(dest="api_key_command", required=True, metavar="API_KEY_COMMAND")
    kc = keysub.add_parser("create", help="create an API key (printed once, stored hashed)")
    kc.add_argument("--database-url", help=DB_HELP)
    kc.add_argument("--collection", default="default")
    kc.add_argument("--name", default="default", help="a label to revoke it by later")
    kc.add_argument("--scope", choices=SCOPES, default="admin", help=SCOPE_HELP)
    kc.set_defaults(func=run_create_api_key)
    kl = keysub.add_parser("list", help="names, scopes, created and revoked times (never hashes)")
    kl.add_argument("--database-url", help=DB_HELP)
    kl.add_argument("--collection", help="only this collection (default: all)")
    kl.set_defaults(func=run_list_api_keys)
    kr = keysub.add_parser("revoke", help="revoke the API keys of a label")
    kr.add_argument("--database-url", help=DB_HELP)
    kr.add_argument("--collection", default="default")
    kr.add_argument("--name", required=True)
    kr.set_defaults(func=run_revoke_api_key)
    ks = keysub.add_parser(
        "set", help="what the keys of a label may be told: exact scores, budgets (audited)",
        description="Grant or withdraw exact similarity scores (a key with them can read enrolled people back out "
        "of the scores: for evaluation and analytics only), set the key's answer budgets per window "
        "(`default`: the service's), or forget its counters. docs/service.md, 'What an answer reveals'.",
    )
    ks.add_argument("--database-url", help=DB_HELP)
    ks.add_argument("--collection", default="default")
    ks.add_argument("--name", required=True)
    ks.add_argument("--exact-scores", action=argparse.BooleanOptionalAction, default=None,
                    help="answers carry exact similarities (--no-exact-scores: decisions and bands)")
    ks.add_argument("--budget-unmatched", type=_budget, metavar="N|default", default=argparse.SUPPRESS,
                    help="faces that matched no one, per window")
    ks.add_argument("--budget-lookalikes", type=_budget, metavar="N|default", default=argparse.SUPPRESS,
                    help="weak matches naming a subject new to the key, per window (before credit)")
    ks.add_argument("--reset-budget", action="store_true", help="forget the key's counters (audited)")
    ks.set_defaults(func=run_set_api_key)

    co = dbsub.add_parser("collection", help="a collection's settings: its operating point")
    cosub = co.add_subparsers(dest="collection_command", required=True, metavar="COLLECTION_COMMAND")
    cs = cosub.add_parser(
        "set", help="the operating point: the false match rate whose calibrated threshold decides a match",
        description="Every replica reads it from the database within seconds (docs/service.md).",
    )
    cs.add_argument("--database-url", help=DB_HELP)
    cs.add_argument("--collection", default="default")
    cs.add_argument("--fmr", required=True, type=_fmr, metavar="FMR|default",
                    help="e.g. 1e-4 (must be one the served scheme and extractor are calibrated at); "
                    "default: the service's ADVPLUGIN_ANSWERS__DECISION_FMR")
    cs.set_defaults(func=run_set_collection)

    au = dbsub.add_parser("audit", help="the audit trail: enrolments, deletions, API-key operations")
    au.add_argument("--database-url", help=DB_HELP)
    au.add_argument("--collection", help="only this collection (default: all)")
    au.add_argument("--limit", type=int, default=1000, help="at most this many events (oldest first)")
    au.add_argument("--offset", type=int, default=0)
    au.set_defaults(func=run_audit)

    rk = dbsub.add_parser("revoke-api-key", help="revoke the API keys of a label")
    rk.add_argument("--database-url", help=DB_HELP)
    rk.add_argument("--collection", default="default")
    rk.add_argument("--name", required=True)
    rk.set_defaults(func=run_revoke_api_key)

    se = dbsub.add_parser(
        "seal", help="encrypt an unsealed gallery in place (chunked, resumable: rerun to continue)",
        description="Creates the gallery's data key (wrapped by the master key, made 0600 "
        "when missing) and seals every plaintext template, one transaction per chunk; then "
        "gives every subject sealed without an erasure key a new subject key with one (its "
        "templates re-sealed), so deleting it shreds it in every copy. Stop or restart "
        "services that write without the master key first.",
    )
    se.add_argument("--database-url", help=DB_HELP)
    se.add_argument("--master-key-file", help=MASTER_HELP)
    se.add_argument("--chunk-size", type=int, default=10_000, help="templates per transaction")
    se.set_defaults(func=run_seal)

    pe = dbsub.add_parser(
        "purge-erased", help="delete subjects whose erasure keys are gone (a gallery restored from a backup)",
        description="A database restored from a backup still holds the rows of subjects deleted "
        "after the backup was made; their erasure keys are shredded, so the rows are unreadable "
        "and the service refuses to load them. This deletes those subjects.",
    )
    pe.add_argument("--database-url", help=DB_HELP)
    pe.set_defaults(func=run_purge_erased)

    rw = dbsub.add_parser(
        "rewrap", help="move the gallery's data keys to a new master key (rows untouched, atomic)",
        description="Re-wraps the gallery data key(s) under the new master key in one "
        "transaction. With --new-data-key, also moves every subject key to a new gallery "
        "data key (resumable: rerun to continue); then a database copy taken before, with "
        "the old master key destroyed, opens nothing (docs/sealed-storage.md, erasure).",
    )
    rw.add_argument("--database-url", help=DB_HELP)
    rw.add_argument("--master-key-file", help="the CURRENT " + MASTER_HELP)
    rw.add_argument("--new-master-key", required=True, help="the new master key file (0600); made when missing")
    rw.add_argument("--new-data-key", action="store_true", help="also re-key the subjects under a new data key")
    rw.add_argument("--chunk-size", type=int, default=10_000, help="subject keys per transaction")
    rw.set_defaults(func=run_rewrap)


def _settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pathlib import Path

    from advplugin.settings import Settings

    extra = {}
    if getattr(args, "master_key_file", None):
        extra["master_key_file"] = Path(args.master_key_file)
    return Settings(**extra)


def _url(args: argparse.Namespace) -> str:
    if args.database_url:
        return args.database_url
    from advplugin.install import prepare_data_dir

    settings = _settings(args)
    prepare_data_dir(settings.data_dir)
    return settings.resolved_database_url


def run_upgrade(args: argparse.Namespace) -> int:
    from advplugin.gallery import make_engine
    from advplugin.gallery.schema import current_revision, upgrade

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
    from advplugin.install import key_location_warnings

    for warning in key_location_warnings(_settings(args)):
        print(f"WARNING: {warning}")
    with Gallery.open(_url(args)) as g:
        info = g.seal_info()
        if info.sealed:
            state = "sealed, converting (run `advplugin db seal` to finish)" if info.converting else "sealed"
            print(f"storage: {state}; data key wrapped by master key id {', '.join(info.master_key_ids)}")
            print(f"erasure: {g.count_unerasable()} subjects without an erasure key (`advplugin db seal` "
                  f"gives them one), {g.pending_erasures()} deleted subjects whose erasure key is still "
                  "to be shredded")
        else:
            print("storage: NOT sealed (a copy of the database reveals the templates); run `advplugin db seal`")
        for name in g.collections():
            print(f"collection {name}: {g.count_subjects(collection=name)} subjects, "
                  f"{g.count_templates(collection=name)} templates")
            for row in g.provenance(collection=name):
                print("  ", ", ".join(f"{k}={v}" for k, v in row.items()))
    return 0


def run_create_api_key(args: argparse.Namespace) -> int:
    from advplugin.gallery import Gallery

    with Gallery.open(_url(args)) as g:
        api_key = g.create_api_key(args.name, collection=args.collection, scope=args.scope)
    print(api_key)
    return 0


def run_list_api_keys(args: argparse.Namespace) -> int:
    from advplugin.gallery import Gallery

    with Gallery.open(_url(args)) as g:
        keys = g.list_api_keys(collection=args.collection)
    for k in keys:
        revoked = f"revoked {k.revoked_at.isoformat()}" if k.revoked_at else "active"
        budgets = "".join(f" {n}={v}" for n, v in (("budget_unmatched", k.budget_unmatched),
                                                    ("budget_lookalikes", k.budget_lookalikes)) if v is not None)
        exact = " exact_scores" if k.exact_scores else ""
        print(f"id={k.id} collection={k.collection} name={k.name} scope={k.scope}{exact}{budgets} "
              f"created={k.created_at.isoformat()} {revoked}")
    return 0


def _budget(text: str) -> int | None:
    if text == "default":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a whole number >= 0, or `default`") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a whole number >= 0, or `default`")
    return value


def _fmr(text: str) -> float | None:
    if text == "default":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a false match rate such as 1e-4, or `default`") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError("a false match rate between 0 and 1, or `default`")
    return value


def run_set_api_key(args: argparse.Namespace) -> int:
    from advplugin.errors import NotFoundError
    from advplugin.gallery import Gallery
    from advplugin.gallery.apikeys import UNSET
    from advplugin.gallery.audit import CLI
    from advplugin.gallery.budgets import AnswerBudgets

    # Absent (SUPPRESS): leave as it is; `default` (None): back to the service's default.
    unmatched = getattr(args, "budget_unmatched", UNSET)
    lookalikes = getattr(args, "budget_lookalikes", UNSET)
    changes = args.exact_scores is not None or unmatched is not UNSET or lookalikes is not UNSET
    if not changes and not args.reset_budget:
        raise ValueError("nothing to set: give --exact-scores/--no-exact-scores, a budget or --reset-budget")
    with Gallery.open(_url(args)) as g:
        keys = [k for k in g.list_api_keys(collection=args.collection) if k.name == args.name and k.revoked_at is None]
        if not keys:
            raise NotFoundError(f"no active API key named {args.name!r} in collection {args.collection!r}")
        if changes:
            g.configure_api_key(args.name, collection=args.collection, exact_scores=args.exact_scores,
                                budget_unmatched=unmatched, budget_lookalikes=lookalikes)
        if args.reset_budget:
            budgets = AnswerBudgets(g)
            for k in keys:
                budgets.reset(k.id)
            g.record_audit(CLI, "set_api_key", collection=args.collection, subject=f"{args.name}: budget reset")
    print(f"updated {len(keys)} API key(s) named {args.name!r}; the service applies it within seconds")
    return 0


def run_set_collection(args: argparse.Namespace) -> int:
    from advplugin.gallery import Gallery
    from advplugin.gallery.audit import CLI
    from advplugin.gallery.budgets import OperatingPoints

    with Gallery.open(_url(args)) as g:
        OperatingPoints(g).set(args.collection, args.fmr, actor=CLI)
    what = "the service's default" if args.fmr is None else f"FMR {args.fmr:g}"
    print(f"collection {args.collection!r} decides at {what}; replicas apply it within seconds")
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from advplugin.errors import NotFoundError
    from advplugin.gallery import Gallery

    with Gallery.open(_url(args)) as g:
        if args.collection is not None and args.collection not in g.collections():
            raise NotFoundError(f"no collection named {args.collection!r}")
        events = g.audit_events(collection=args.collection, offset=args.offset, limit=args.limit)
    for e in events:
        who = f"api-key:{e.api_key_id}" if e.api_key_id is not None else e.actor
        count = f" templates={e.template_count}" if e.template_count is not None else ""
        subject = f" subject={e.subject!r}" if e.subject is not None else ""
        print(f"{e.created_at.isoformat()} #{e.id} collection={e.collection} by={who} {e.action}{subject}{count}")
    return 0


def run_revoke_api_key(args: argparse.Namespace) -> int:
    from advplugin.gallery import Gallery

    with Gallery.open(_url(args)) as g:
        n = g.revoke_api_keys(args.name, collection=args.collection)
    print(f"revoked {n} API key(s) named {args.name!r}")
    return 0


def _provider(args: argparse.Namespace, *, create: bool) -> KeyProvider:
    from advplugin.errors import ConfigurationError
    from advplugin.install import master_key_provider

    settings = _settings(args)
    provider = master_key_provider(settings, create=create)
    if provider is None:
        raise ConfigurationError(
            f"no master key: {settings.resolved_master_key_file} does not exist; pass "
            "--master-key-file or set ADVPLUGIN_MASTER_KEY_FILE / ADVPLUGIN_MASTER_KEY"
        )
    return provider


def run_seal(args: argparse.Namespace) -> int:
    from advplugin.gallery import Gallery

    if args.chunk_size < 1:
        raise ValueError("--chunk-size must be positive")
    url = _url(args)
    with Gallery.open(url) as g:
        before = g.seal_info()
        provider = _provider(args, create=not before.sealed)
        g.unlock(provider, erasure=_erasure(args), seal_if_empty=True)
        done = 0
        for n in g.seal_templates(chunk_size=args.chunk_size):
            done += n
            print(f"sealed {done} templates", flush=True)
        erasable = 0
        for n in g.make_subjects_erasable(chunk_size=args.chunk_size):
            erasable += n
            print(f"gave {erasable} subjects erasure keys (templates re-sealed)", flush=True)
        info = g.seal_info()
    print(f"gallery sealed: {done} templates converted now, {erasable} subjects given erasure keys "
          f"({info.erasure_store}); data key wrapped by master key id {', '.join(info.master_key_ids)} "
          f"({provider.description})")
    return 0


def run_purge_erased(args: argparse.Namespace) -> int:
    from advplugin.install import open_configured_gallery

    with open_configured_gallery(_settings(args), _url(args), seal_new=False) as g:
        gone = g.purge_erased()
    print(f"purged {len(gone)} subjects whose erasure keys were shredded (deleted after this copy was made)")
    return 0


def _erasure(args: argparse.Namespace) -> ErasureKeyStore | None:
    from advplugin.install import erasure_key_store

    return erasure_key_store(_settings(args))


def run_rewrap(args: argparse.Namespace) -> int:
    from pathlib import Path

    from advplugin.gallery import Gallery
    from advplugin.gallery.master_keys import LocalKeyProvider

    if args.chunk_size < 1:
        raise ValueError("--chunk-size must be positive")
    new = LocalKeyProvider.from_file(Path(args.new_master_key), create=True)
    url = _url(args)
    with Gallery.open(url) as g:
        info = g.seal_info()
        if not info.sealed:
            raise ValueError("this gallery is not sealed; run `advplugin db seal` first")
        if info.master_key_ids == [new.key_id]:
            print(f"data keys already wrapped by master key id {new.key_id}")
        else:
            g.unlock(_provider(args, create=False), erasure=_erasure(args), seal_if_empty=False)
            n = g.rewrap(new)
            print(f"re-wrapped {n} data key(s) under master key id {new.key_id} ({new.description})")
        if args.new_data_key:
            g.unlock(new, erasure=_erasure(args), seal_if_empty=False)
            serial = g.begin_rekey()
            moved = 0
            for n in g.rekey_subjects(chunk_size=args.chunk_size):
                moved += n
                print(f"moved {moved} subject keys to data key #{serial}", flush=True)
            print(f"re-keyed: every subject key is under data key #{serial}; older data keys deleted")
    print("keep the new master key; destroy the old one once backups made before are to become unreadable")
    return 0
