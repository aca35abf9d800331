"""`advplugin migrate` and `advplugin rotate-key`: move a raw feature database into a
protected gallery, and re-key a gallery without raw embeddings."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from advplugin.cli.common import add_option_argument, parse_options
from advplugin.cli.protect import build_protector

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from advplugin.bulk import Source
    from advplugin.gallery import Gallery


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "migrate",
        help="protect an existing raw feature database into a gallery (resumable)",
        description="Validate a source of raw embeddings, then protect it into a gallery in "
        "chunks, each chunk committed together with its checkpoint. Re-running the same command "
        "after a crash or Ctrl-C continues where it stopped, with no duplicate and no gap.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--from",
        dest="source",
        help="SQLAlchemy URL of a database holding a table of vectors, or a .npy/.npz/.faiss file",
    )
    src.add_argument(
        "--from-compreface",
        metavar="URL",
        help="a CompreFace PostgreSQL database: every recognition service (API key) becomes a "
        "collection named after it, its API key an advplugin key (docs/compreface.md)",
    )
    src.add_argument(
        "--from-deepface",
        metavar="URL",
        help="a deepface PostgreSQL database (table `embeddings`, or a pgvector table); the "
        "subject is the folder of img_name (docs/compreface.md)",
    )
    p.add_argument("--to", dest="gallery", required=True, help="SQLAlchemy URL of the gallery")
    p.add_argument(
        "--collection", default=None,
        help="gallery collection (tenant); default: `default` (--from-compreface: the service's name)",
    )
    p.add_argument("--scheme", required=True, help="protection scheme, e.g. xnn")
    p.add_argument("--key", help="key file (from `advplugin keygen`)")
    p.add_argument("--extractor", required=True, help="name of the extractor that made the vectors")
    p.add_argument("--extractor-version", default="unknown", help="its version (recorded per row)")
    g = p.add_argument_group("SQL sources (also array names of an .npz)")
    g.add_argument("--table", help="table holding the vectors")
    g.add_argument("--id-column", help="unique, ordered id column (SQL default: id; npz: path)")
    g.add_argument("--subject-column", help="subject column (SQL default: subject; npz: identity)")
    g.add_argument("--vector-column", help="vector column (default: embedding)")
    g.add_argument(
        "--vector-format",
        default="auto",
        choices=["auto", "float32", "float64", "array", "json"],
        help="how vectors are stored: float32/float64 bytes, SQL arrays, or JSON text (auto: by type)",
    )
    g.add_argument("--deepface-table", help="--from-deepface: the table (default: the one deepface table)")
    g.add_argument("--deepface-model", help="--from-deepface: only rows of this model_name")
    p.add_argument("--mapping", help="CSV (id,subject) or JSON mapping file for .npy/.faiss sources")
    p.add_argument("--chunk-size", type=int, default=10_000, help="rows per chunk and transaction")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="protection threads")
    p.add_argument("--dry-run", action="store_true", help="validate and report the plan; write nothing")
    p.add_argument("--upgrade", action="store_true", help="apply the gallery's schema migrations first")
    p.add_argument("--verify", action="store_true", help="compare raw vs protected search afterwards")
    p.add_argument("--verify-samples", type=int, default=1000, help="probes sampled by --verify")
    p.add_argument("--top-k", type=int, default=5, help="top-k compared by --verify")
    p.add_argument(
        "--min-agreement", type=float, default=0.99, help="rank-1 agreement --verify requires"
    )
    p.add_argument(
        "--purge-source",
        action="store_true",
        help="after a PASSING --verify, delete the raw vectors from the source",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_migrate)

    r = sub.add_parser(
        "rotate-key",
        help="re-key every template under one key to another (xnn; resumable, no raw data)",
        description="Re-protects stored templates from the old key to the new one, one "
        "transaction per chunk; re-run to resume. Schemes that cannot be re-keyed without raw "
        "embeddings are refused with what to do instead.",
    )
    r.add_argument("--gallery", required=True, help="SQLAlchemy URL of the gallery")
    r.add_argument("--old-key", required=True, help="key file the templates are under now")
    r.add_argument("--new-key", required=True, help="key file to move them to")
    r.add_argument("--chunk-size", type=int, default=10_000, help="templates per transaction")
    r.add_argument("--dry-run", action="store_true", help="report what would be re-keyed")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_option_argument(r, "--option", "scheme (the options the templates were made with, e.g. release=1)")
    r.set_defaults(func=run_rotate)


def _gallery(url: str, *, upgrade: bool, seal_new: bool = True) -> Gallery:
    """The gallery at `url`, opened as the service opens one (`advplugin.install`): unlocked
    with the settings' master key when sealed, sealed when new (not on a dry run)."""
    from advplugin.gallery import NotMigratedError
    from advplugin.install import open_configured_gallery
    from advplugin.settings import Settings

    try:
        return open_configured_gallery(Settings(), url, upgrade=upgrade, seal_new=seal_new)
    except NotMigratedError as e:
        e.add_note("(or pass --upgrade)")  # this command's own way out; `main` prints notes
        raise


def _open_sources(args: argparse.Namespace) -> tuple[list[tuple[Source, str]], Engine | None]:
    """[(source, collection)] of the command line, and an engine to dispose at the end (the
    CompreFace preset's sources share one)."""
    from advplugin.bulk import open_source
    from advplugin.bulk.presets import DeepFaceSource, compreface_collections, compreface_services

    if args.from_compreface:
        engine, sources = compreface_services(args.from_compreface)
        if not sources:
            engine.dispose()
            raise ValueError("the CompreFace database holds no embeddings")
        return list(zip(sources, compreface_collections(sources, args.collection), strict=True)), engine
    collection = args.collection or "default"
    if args.from_deepface:
        source = DeepFaceSource(args.from_deepface, table=args.deepface_table, model_name=args.deepface_model)
        return [(source, collection)], None
    source = open_source(
        args.source,
        table=args.table,
        id_column=args.id_column,
        subject_column=args.subject_column,
        vector_column=args.vector_column,
        vector_format=args.vector_format,
        mapping=args.mapping,
    )
    return [(source, collection)], None


def run_migrate(args: argparse.Namespace) -> int:
    if args.chunk_size < 1:
        raise ValueError("--chunk-size must be positive")
    if args.purge_source and not args.verify:
        raise ValueError("--purge-source needs --verify: raw vectors are deleted only after it passes")
    sources, engine = _open_sources(args)
    try:
        gallery = _gallery(args.gallery, upgrade=args.upgrade and not args.dry_run, seal_new=not args.dry_run)
        try:
            status = 0
            for source, collection in sources:
                status = max(status, _migrate_one(args, source, gallery, collection))
            return status
        finally:
            gallery.close()
    finally:
        for source, _ in sources:
            source.close()
        if engine is not None:
            engine.dispose()


def _migrate_one(args: argparse.Namespace, source: Source, gallery: Gallery, collection: str) -> int:
    """Validate, migrate, verify and (after a passing verify) purge one source."""
    from advplugin.bulk import (
        job_name,
        load_job,
        migrate,
        set_job_state,
        validate_source,
        verify_migration,
    )

    progress = not args.no_progress
    report = validate_source(source, chunk_size=args.chunk_size, progress=progress)
    print(f"source: {source.describe()}")
    calculator = getattr(source, "calculator", None)
    if calculator is not None:
        print(f"made by: {calculator} (CompreFace calculator; recorded as extractor version)")
    print(
        f"rows: {report.rows}, dimension {report.dim}, {report.subjects} subjects, "
        f"{report.bad} invalid, {report.duplicate_ids} duplicate ids"
    )
    for problem in report.problems():
        print(f"problem: {problem}")
    if not report.ok or report.dim is None:
        print("nothing migrated: fix the source first" if report.rows else "source is empty")
        return 1
    protector = build_protector(args.scheme, args.key, report.dim, {})
    name = job_name(source, collection, protector)
    job = load_job(gallery, name)
    m = protector.metadata
    safe_url = gallery.engine.url.render_as_string(hide_password=True)
    print(
        f"plan: protect {report.rows} vectors with {m.scheme} v{m.scheme_version} (key id "
        f"{m.key_id}) into {safe_url} collection {collection!r}, chunks of "
        f"{args.chunk_size}, {args.workers} threads"
    )
    if job is None:
        print("checkpoint: new job")
    else:
        print(f"checkpoint: job {job.id} ({job.state}), {job.rows} rows in {job.chunks} chunks done")
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    sys.stdout.flush()  # the plan reaches a log even if the run is killed
    try:
        result = migrate(
            source,
            gallery,
            protector,
            collection=collection,
            extractor_name=args.extractor,
            extractor_version=calculator if args.extractor_version == "unknown" and calculator
            else args.extractor_version,
            chunk_size=args.chunk_size,
            workers=args.workers,
            progress=progress,
        )
    except KeyboardInterrupt:
        done = load_job(gallery, name)
        print(
            f"interrupted: {done.rows if done else 0} rows are committed; re-run the same "
            "command to continue",
            file=sys.stderr,
        )
        raise
    rate = result.written / result.seconds if result.seconds > 0 else 0.0
    print(
        f"migrated: {result.written} rows in {result.seconds:.1f} s ({rate:.0f} rows/s); job "
        f"{result.job_id} holds {result.rows} rows ({result.resumed_from} from earlier runs)"
    )
    if hasattr(source, "grant_api_key") and source.grant_api_key(gallery, collection):
        print(f"api key: the CompreFace service's API key now opens collection {collection!r} (scope enrol)")
    if not args.verify:
        return 0
    v = verify_migration(
        source,
        gallery,
        protector,
        job_id=result.job_id,
        collection=collection,
        samples=args.verify_samples,
        top_k=args.top_k,
        chunk_size=args.chunk_size,
        min_agreement=args.min_agreement,
    )
    print(v.render())
    if not v.passed:
        if args.purge_source:
            print("purge: NOT done, verify failed; the source is untouched")
        return 1
    set_job_state(gallery, result.job_id, "verified")
    if args.purge_source:
        print(f"purge: {source.purge()}")
        set_job_state(gallery, result.job_id, "purged")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    from advplugin.bulk import plan_rotation, rotate_key
    from advplugin.keys import load_key

    old, new = load_key(args.old_key), load_key(args.new_key)
    gallery = _gallery(args.gallery, upgrade=False)
    try:
        options = parse_options(args.option)
        plan, already_new = plan_rotation(gallery, old, new, options)
        for group in plan:
            print(
                f"plan: {group.count} templates {group.scheme} v{group.scheme_version} dim "
                f"{group.dim}: key id {old.key_id} -> {new.key_id}"
            )
        if already_new:
            print(f"already under the new key: {already_new} templates (an earlier run)")
        if not plan:
            print(f"nothing to rotate: no template is under key id {old.key_id}")
            return 0
        if args.dry_run:
            print("dry run: nothing written")
            return 0
        result = rotate_key(
            gallery, old, new, chunk_size=args.chunk_size, progress=not args.no_progress, options=options
        )
        left = gallery.count_templates(collection=None, key_id=old.key_id)
        print(
            f"rotated: {result.rotated} templates in {result.chunks} chunks, "
            f"{result.seconds:.1f} s; {left} left under the old key"
        )
        return 0 if left == 0 else 1
    finally:
        gallery.close()
