"""Batch migration of raw embeddings into a protected gallery: validate, then stream.

Per chunk: read and protect (a background thread reads and protects the next chunk while
this one is sealed and written; protection runs on all cores: threads, because numpy's
matrix products release the GIL, and threads share the one protector, so neither the key nor
raw vectors are ever pickled to another process), then ONE gallery transaction holds the
chunk's templates, its `migration_chunks` row (which template each source row became) and
the advanced job cursor. A run killed at any instant therefore leaves either the whole chunk
or none of it, and the next run continues at the committed cursor: no duplicate, no gap.

Memory is bounded by one chunk of raw vectors (the one being read and protected) and about
three of templates (that one, one queued, one being written), whatever the size of the source.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from sqlalchemy import insert, select, text, update

from advplugin.bulk.models import MigrationChunk, MigrationJob
from advplugin.bulk.sources import Chunk, Cursor, Source
from advplugin.gallery import DEFAULT_COLLECTION, Gallery
from advplugin.gallery.models import utcnow
from advplugin.protectors import Protector

MAX_EXAMPLES = 10  # bad rows named in a report
T = TypeVar("T")


# -- validation ----------------------------------------------------------------------------
@dataclass
class ValidationReport:
    """What a dry run found; names rows by id, never shows values."""

    source: str
    rows: int = 0
    dim: int | None = None
    dims: dict[int, int] = field(default_factory=dict)
    bad: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)
    subjects: int = 0
    duplicate_ids: int = 0
    #: canonical name -> the source's spellings of it (2 or more): two names that only look
    #: different (NFC/NFD, padding) would become ONE subject in the gallery.
    name_collisions: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.bad == 0 and len(self.dims) <= 1 and self.duplicate_ids == 0 and not self.name_collisions

    def problems(self) -> list[str]:
        out = []
        if len(self.dims) > 1:
            out.append(f"vectors of several dimensions: {dict(sorted(self.dims.items()))} rows")
        if self.bad:
            shown = "; ".join(f"id {i}: {why}" for i, why in self.examples)
            out.append(f"{self.bad} invalid rows (first: {shown})")
        if self.duplicate_ids:
            out.append(f"{self.duplicate_ids} duplicate ids")
        if self.name_collisions:
            shown = "; ".join(
                f"{c!r} from {', '.join(map(repr, forms))}"
                for c, forms in list(self.name_collisions.items())[:MAX_EXAMPLES]
            )
            out.append(
                f"{len(self.name_collisions)} subject names differ only in Unicode form or blanks, "
                f"so each group would be merged into one subject (first: {shown}); rename them in "
                "the source (names are stored canonical: NFC, trimmed)"
            )
        return out


def validate_source(
    source: Source, *, chunk_size: int, after: Cursor = None, progress: bool = False
) -> ValidationReport:
    """One pass over the rows after `after`: dimension, NaN/inf, zero vectors, undecodable
    values, duplicate ids, number of subjects."""
    report = ValidationReport(source=source.describe())
    subjects: set[str] = set()
    spellings: dict[str, set[str]] = {}  # canonical -> the source's other spellings of it
    as_is: set[str] = set()  # canonical names the source also spells that way
    seen_ids: set[str] = set()
    check_ids = not hasattr(source, "distinct_ids")  # SQL counts distinct ids itself
    with _progress(source.count(), 0, "validate", progress) as bar:
        for chunk in source.chunks(chunk_size, after):
            n_rows = len(chunk) + len(chunk.bad)
            report.rows += n_rows
            if len(chunk):
                d = chunk.vectors.shape[1]
                report.dims[d] = report.dims.get(d, 0) + len(chunk)
            report.bad += len(chunk.bad)
            report.examples.extend(chunk.bad[: MAX_EXAMPLES - len(report.examples)])
            subjects.update(chunk.subjects)
            for given, c in zip(chunk.names_given, chunk.subjects, strict=True):
                if given == c:
                    as_is.add(c)
                else:
                    spellings.setdefault(c, set()).add(given)
            if check_ids:
                for i in chunk.ids:
                    if i in seen_ids:
                        report.duplicate_ids += 1
                    seen_ids.add(i)
            bar.update(n_rows)
    if not check_ids and after is None:
        report.duplicate_ids = source.count() - source.distinct_ids()  # type: ignore[attr-defined]
    report.subjects = len(subjects)
    for c, forms in spellings.items():  # spelled two ways: two names, one subject
        given = forms | ({c} if c in as_is else set())
        if len(given) > 1:
            report.name_collisions[c] = sorted(given)
    if report.dims:
        report.dim = max(report.dims, key=report.dims.__getitem__)
    return report


# -- jobs (checkpoints) --------------------------------------------------------------------
def job_name(source: Source, collection: str, protector: Protector) -> str:
    m = protector.metadata
    text = json.dumps([source.name, collection, m.scheme, m.scheme_version, m.key_id])
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class JobState:
    id: int
    cursor: Cursor
    chunks: int
    rows: int
    state: str


def load_job(gallery: Gallery, name: str) -> JobState | None:
    with gallery.engine.connect() as conn:
        r = conn.execute(select(MigrationJob).where(MigrationJob.name == name)).first()
    if r is None:
        return None
    cursor = json.loads(r.cursor) if r.cursor is not None else None
    return JobState(int(r.id), cursor, int(r.chunks), int(r.rows), r.state)


def _ensure_job(
    gallery: Gallery, name: str, source: Source, collection: str, protector: Protector
) -> JobState:
    job = load_job(gallery, name)
    if job is not None:
        return job
    cid = gallery.collection_id(collection)
    m = protector.metadata
    with gallery.engine.begin() as conn:
        conn.execute(
            insert(MigrationJob).values(
                name=name,
                source=source.describe()[:1024],
                collection_id=cid,
                scheme=m.scheme,
                key_id=m.key_id,
                cursor=None,
                chunks=0,
                rows=0,
                state="running",
                created_at=utcnow(),
                updated_at=utcnow(),
            )
        )
    job = load_job(gallery, name)
    assert job is not None
    return job


def set_job_state(gallery: Gallery, job_id: int, state: str) -> None:
    with gallery.engine.begin() as conn:
        conn.execute(
            update(MigrationJob)
            .where(MigrationJob.id == job_id)
            .values(state=state, updated_at=utcnow())
        )


# PostgreSQL: a chunk's items as two array parameters in one statement; psycopg's
# executemany cost about 1 s per 10,000 rows, as much as the templates themselves.
_PG_INSERT_ITEMS = text(
    "INSERT INTO migration_items (job_id, source_id, template_id) "
    "SELECT :job_id, u.source_id, u.template_id "
    "FROM unnest(CAST(:source_ids AS VARCHAR[]), CAST(:template_ids AS BIGINT[])) AS u(source_id, template_id)"
)


def pack_source_ids(ids: list[str]) -> bytes:
    """A chunk's source ids in order, as `migration_chunks.source_ids` holds them."""
    return zlib.compress(json.dumps(ids, separators=(",", ":")).encode(), 1)


def unpack_source_ids(blob: bytes) -> list[str]:
    return [str(i) for i in json.loads(zlib.decompress(blob))]


def _numeric(ids: list[str]) -> bool:
    """Whether every id reads as a number, which the service never looks up as a source id
    (it reads a numeric image id as a template id): then no per-row item is needed."""
    if not ids:
        return True
    joined = "".join(ids)  # one C-level pass instead of three calls per id
    return joined.isascii() and joined.isdigit() and 0 < min(map(len, ids)) and max(map(len, ids)) < 19


def _record_chunk(tx: Gallery, job_id: int, seq: int, source_ids: list[str], template_ids: list[int]) -> None:
    """Which template each source row became, in the chunk's transaction: ONE
    `migration_chunks` row when the chunk's templates are one contiguous block and no client
    can hold its source ids; otherwise (also) one `migration_items` row per source row."""
    contiguous = template_ids[-1] - template_ids[0] + 1 == len(template_ids)
    per_row = not contiguous or not _numeric(source_ids)
    tx.connection.execute(
        insert(MigrationChunk).values(
            job_id=job_id, seq=seq, first_template_id=template_ids[0], last_template_id=template_ids[-1],
            rows=len(template_ids), source_ids=None if per_row else pack_source_ids(source_ids),
        )
    )
    if not per_row:
        return
    if tx.dialect == "postgresql":
        params = {"job_id": job_id, "source_ids": source_ids, "template_ids": template_ids}
        tx.connection.execute(_PG_INSERT_ITEMS, params)
        return
    # SQLite: plain tuples to the driver's executemany (SQLAlchemy's per-row dicts cost
    # more than the insert itself).
    tx.connection.exec_driver_sql(
        "INSERT INTO migration_items (job_id, source_id, template_id) VALUES (?, ?, ?)",
        [(job_id, s, t) for s, t in zip(source_ids, template_ids, strict=True)],
    )


# -- parallel protection -------------------------------------------------------------------
class ParallelProtect:
    """Splits a chunk across threads sharing one protector (the key stays in this process).

    BLAS is limited to one thread per call meanwhile: N threads each running a
    single-threaded matrix product use N cores without the oversubscription of N threads
    each starting a multi-threaded BLAS (which on a busy machine is slower than one core).
    """

    def __init__(self, protector: Protector, workers: int | None = None) -> None:
        from threadpoolctl import threadpool_limits

        self.protector = protector
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._blas = threadpool_limits(limits=1, user_api="blas")
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="protect")
        protector.protect(np.ones((1, protector.dim), np.float32))  # build the transform once

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        if self.workers == 1 or len(raw) < 2 * self.workers:
            return self.protector.protect(raw)
        parts = np.array_split(raw, self.workers)
        return np.concatenate(list(self._pool.map(self.protector.protect, parts)))

    def close(self) -> None:
        self._pool.shutdown()
        self._blas.restore_original_limits()


def protected_chunks(chunks: Iterator[Chunk], protect: ParallelProtect) -> Iterator[tuple[Chunk, np.ndarray | None]]:
    """Each chunk with its protected templates (None: empty, or invalid rows), its raw
    vectors dropped as soon as they are protected. Run inside `prefetch`, so the next chunk
    is read and protected while this one is sealed and written."""
    for chunk in chunks:
        templates = protect(chunk.vectors) if len(chunk) and not chunk.bad else None
        chunk.vectors = np.empty((0, 0), np.float32)
        yield chunk, templates


def prefetch(chunks: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Produce the next item (read a chunk, and protect it) in a background thread while
    the current one is processed."""
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item: object) -> bool:
        """Hand `item` over; False once the consumer has gone (never blocks past that)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for c in chunks:
                if not put(c):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, re-raised there
            put(e)

    t = threading.Thread(target=reader, name="migration-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()


@contextmanager
def _stop_between_chunks() -> Iterator[Callable[[], None]]:
    """Ctrl-C stops the run at the next chunk boundary (the returned check raises the
    KeyboardInterrupt there); a second Ctrl-C stops it at once. Why: a KeyboardInterrupt
    raised inside the database driver's call (a PostgreSQL COPY) left the connection in the
    middle of a command, its rollback failed, and the run ended with a driver traceback
    instead of the clean "N rows are committed" stop (nothing was ever half-written: the
    chunk's transaction had not committed). Only in the main thread with Python's own
    handler installed; otherwise the check does nothing and signals behave as they did."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield lambda: None
        return
    pending = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if pending.is_set():
            raise KeyboardInterrupt
        pending.set()

    def check() -> None:
        if pending.is_set():
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _progress(total: int, initial: int, what: str, enabled: bool) -> Iterator[object]:
    """A tqdm bar on stderr: count, rate and ETA."""
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        initial=initial,
        desc=what,
        unit="vec",
        unit_scale=True,
        smoothing=0.05,
        mininterval=0.5,
        file=sys.stderr,
        disable=not enabled,
    )
    try:
        yield bar
    finally:
        bar.close()


# -- migration -----------------------------------------------------------------------------
@dataclass
class MigrationResult:
    job_id: int
    rows: int  # in the job in total, earlier runs included
    written: int  # by this run
    chunks: int
    resumed_from: int  # rows that an earlier run had committed
    seconds: float
    state: str


def migrate(
    source: Source,
    gallery: Gallery,
    protector: Protector,
    *,
    collection: str = DEFAULT_COLLECTION,
    extractor_name: str,
    extractor_version: str,
    chunk_size: int = 10_000,
    workers: int | None = None,
    progress: bool = False,
) -> MigrationResult:
    """Protect every source row into `collection`, resuming an earlier run of the same job.

    Call `validate_source` first (the CLI does): a chunk with invalid rows stops the run
    before anything of that chunk is written.
    """
    if not protector.protects:
        raise ValueError(
            f"scheme {protector.metadata.scheme!r} does not protect; refusing to copy raw "
            "embeddings into the gallery"
        )
    name = job_name(source, collection, protector)
    job = _ensure_job(gallery, name, source, collection, protector)
    cid = gallery.collection_id(collection)
    start = time.perf_counter()
    written, chunks, cursor = 0, job.chunks, job.cursor
    protect = ParallelProtect(protector, workers)
    total = source.count()
    try:
        with _progress(total, job.rows, "migrate", progress) as bar, _stop_between_chunks() as stop_if_asked:
            for chunk, templates in prefetch(protected_chunks(source.chunks(chunk_size, cursor), protect)):
                if chunk.bad:
                    shown = "; ".join(f"id {i}: {why}" for i, why in chunk.bad[:MAX_EXAMPLES])
                    raise ValueError(
                        f"{len(chunk.bad)} invalid rows in the source (first: {shown}); "
                        "nothing of this chunk was written, fix them and re-run"
                    )
                chunks += 1
                # One transaction: the chunk's templates (and their change-log rows), its
                # item rows and the advanced cursor commit together or not at all. Durable,
                # like every gallery commit: a commit that returned before reaching the disk
                # (PostgreSQL synchronous_commit=off, SQLite synchronous=NORMAL) would be
                # seen by other processes' index followers and could then be undone by a
                # crash, its change sequence numbers and template ids reused for other rows.
                with gallery.transaction() as tx:
                    conn = tx.connection
                    ids: list[int] = []
                    if templates is not None:
                        ids = tx.add_templates(
                            chunk.subjects,
                            templates,
                            protection=protector.metadata,
                            extractor_name=extractor_name,
                            extractor_version=extractor_version,
                            collection=collection,
                        )
                        _record_chunk(tx, job.id, chunks, [str(i) for i in chunk.ids], ids)
                    conn.execute(
                        update(MigrationJob)
                        .where(MigrationJob.id == job.id, MigrationJob.collection_id == cid)
                        .values(
                            cursor=json.dumps(chunk.cursor),
                            chunks=chunks,
                            rows=MigrationJob.rows + len(ids),
                            state="running",
                            updated_at=utcnow(),
                        )
                    )
                written += len(ids)
                bar.update(len(ids))  # type: ignore[attr-defined]
                stop_if_asked()
    finally:
        protect.close()
    final = load_job(gallery, name)
    assert final is not None
    if final.state == "running":
        set_job_state(gallery, final.id, "done")
    return MigrationResult(
        job_id=final.id,
        rows=final.rows,
        written=written,
        chunks=final.chunks,
        resumed_from=job.rows,
        seconds=time.perf_counter() - start,
        state="done" if final.state == "running" else final.state,
    )
