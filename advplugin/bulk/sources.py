"""Readers for the feature databases teams already hold.

A source yields raw embeddings in chunks, in a stable order, starting after a *cursor*
(the last id of the previous chunk for a SQL table, a row offset for files), so that a
migration can stop anywhere and continue exactly where its last committed chunk ended.
Only one chunk of raw vectors is in memory at a time: files are memory-mapped or read
sequentially, SQL tables are paged by key, never fetched whole.

Errors name ids, rows and columns, never vector values: those are biometric data.
"""

from __future__ import annotations

import csv
import json
import os
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from advplugin.gallery.names import canonical_name

Cursor = int | str | None
VectorFormat = Literal["auto", "float32", "float64", "array", "json"]


@dataclass
class Chunk:
    """One page of a source. `vectors` are raw embeddings: they must die with the chunk."""

    ids: list[str]
    subjects: list[str]
    vectors: np.ndarray  # float32 [n, dim]
    cursor: Cursor  # resume point after this chunk
    bad: list[tuple[str, str]]  # (id, reason) for rows that could not be decoded
    #: the subject names as the source spells them, parallel to `subjects` (their
    #: canonical forms, `make_chunk`)
    names_given: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:  # never show vectors, even in a debugger or a traceback
        return f"Chunk(n={len(self.ids)}, cursor={self.cursor!r}, bad={len(self.bad)})"


class Source(ABC):
    """A feature database to migrate from."""

    #: A stable name for checkpoints: the same source gives the same name on every run.
    name: str

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def chunks(self, size: int, after: Cursor = None) -> Iterator[Chunk]:
        """Rows in a stable order, `size` at a time, starting after `after`."""

    @abstractmethod
    def purge(self) -> str:
        """Delete the raw vectors; return a sentence saying what was deleted."""

    def describe(self) -> str:
        return self.name

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def decode_vectors(
    values: list[Any], ids: list[str], fmt: VectorFormat
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode one page of stored vectors; returns (float32 [k, D], kept row numbers, bad rows).

    Pages where every value has the same layout take one vectorised path; otherwise each
    row is decoded alone, the dimension is the most common one on the page, and NULLs,
    other lengths and undecodable values are reported by id, never by content.
    """
    fast = _decode_uniform(values, fmt)
    if fast is not None:
        return fast, list(range(len(values))), []
    rows: list[np.ndarray | None] = []
    bad: list[tuple[str, str]] = []
    for rid, value in zip(ids, values, strict=True):
        try:
            rows.append(_decode_one(value, fmt))
        except (ValueError, TypeError) as e:
            rows.append(None)
            bad.append((rid, str(e)))
    lengths = [len(r) for r in rows if r is not None]
    if not lengths:
        return np.zeros((0, 0), np.float32), [], bad
    dim = int(np.bincount(lengths).argmax())
    keep = []
    for i, r in enumerate(rows):
        if r is None:
            continue
        if len(r) != dim:
            bad.append((ids[i], f"dimension {len(r)} (others have {dim})"))
            continue
        keep.append(i)
    vectors = np.empty((len(keep), dim), np.float32)
    for j, i in enumerate(keep):
        vectors[j] = rows[i]
    return vectors, keep, bad


def _decode_uniform(values: list[Any], fmt: VectorFormat) -> np.ndarray | None:
    """The whole page at once when all values are bytes of one length or equal-length
    sequences; None to fall back to row-by-row decoding."""
    if not values:
        return None
    first = values[0]
    if isinstance(first, bytes | memoryview) and fmt in ("auto", "float32", "float64"):
        itemsize = 8 if fmt == "float64" else 4
        blobs = [bytes(v) if isinstance(v, memoryview) else v for v in values]
        width = len(blobs[0])
        if (
            width == 0
            or width % itemsize
            or any(not isinstance(b, bytes) or len(b) != width for b in blobs)
        ):
            return None
        dtype = "<f8" if itemsize == 8 else "<f4"
        return (
            np.frombuffer(b"".join(blobs), dtype=dtype).reshape(len(blobs), -1).astype(np.float32)
        )
    if isinstance(first, list | tuple | np.ndarray) and fmt in ("auto", "array"):
        try:
            arr = np.asarray(values, dtype=np.float32)
        except (ValueError, TypeError):
            return None
        return arr if arr.ndim == 2 and arr.shape[1] > 0 else None
    return None


def _decode_one(value: Any, fmt: VectorFormat) -> np.ndarray:
    if value is None:
        raise ValueError("vector is NULL")
    if isinstance(value, memoryview):
        value = value.tobytes()
    if fmt == "auto":
        if isinstance(value, bytes | bytearray):
            fmt = "float32"
        elif isinstance(value, str):
            fmt = "json"
        else:
            fmt = "array"
    if fmt in ("float32", "float64"):
        if not isinstance(value, bytes | bytearray):
            raise TypeError(f"expected bytes for format {fmt}, got {type(value).__name__}")
        itemsize = 4 if fmt == "float32" else 8
        if len(value) % itemsize:
            raise ValueError(f"{len(value)} bytes is not a whole number of {fmt} values")
        return np.frombuffer(value, dtype="<f4" if fmt == "float32" else "<f8")
    if fmt == "json":
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            raise ValueError("vector text is not JSON") from None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        # numpy's message quotes the value: a raw vector must never reach a report or log.
        raise ValueError("vector values are not numbers") from None
    if arr.ndim != 1:
        raise ValueError(f"vector must be one-dimensional, got {arr.ndim} dimensions")
    return arr


def check_values(ids: list[str], vectors: np.ndarray) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Rows a protector would refuse (NaN, infinity, zero vector), by id; returns the mask
    of good rows and the reasons for the others."""
    finite = np.isfinite(vectors).all(axis=1)
    nonzero = np.zeros(len(vectors), bool)
    nonzero[finite] = np.linalg.norm(vectors[finite], axis=1) > 1e-12
    good = finite & nonzero
    bad = [
        (ids[i], "NaN or infinite values" if not finite[i] else "zero vector")
        for i in np.flatnonzero(~good)
    ]
    return good, bad


def make_chunk(
    ids: list[str],
    subjects: list[str],
    vectors: np.ndarray,
    cursor: Cursor,
    bad: list[tuple[str, str]],
) -> Chunk:
    """A chunk of the rows whose vectors and subject names are usable; the others in `bad`
    by id. Names take their canonical form (`canonical_name`), the one the gallery stores;
    the source's spellings stay in `names_given`, so validation can tell when two of the
    source's names would become one subject."""
    good, value_bad = check_values(ids, vectors)
    canonical: list[str] = []
    for i, name in enumerate(subjects):
        try:
            canonical.append(canonical_name(name))
        except ValueError as e:
            good[i] = False
            value_bad.append((ids[i], str(e)))
            canonical.append("")
    if not good.all():
        keep = np.flatnonzero(good)
        ids, vectors = [ids[i] for i in keep], vectors[keep]
        canonical, subjects = [canonical[i] for i in keep], [subjects[i] for i in keep]
    return Chunk(ids, canonical, np.ascontiguousarray(vectors, np.float32), cursor, bad + value_bad, list(subjects))


def _page(
    ids: list[str], subjects: list[str], values: list[Any], fmt: VectorFormat, cursor: Cursor
) -> Chunk:
    vectors, keep, bad = decode_vectors(values, ids, fmt)
    return make_chunk([ids[i] for i in keep], [subjects[i] for i in keep], vectors, cursor, bad)


class SqlTableSource(Source):
    """A table reached through a SQLAlchemy URL, paged by its id column (keyset pagination,
    so page k costs the same as page 1 and a resumed run starts with an index seek)."""

    def __init__(
        self,
        url: str,
        *,
        table: str,
        id_column: str,
        subject_column: str,
        vector_column: str,
        vector_format: VectorFormat = "auto",
    ) -> None:
        import sqlalchemy as sa

        self._sa = sa
        self.engine = sa.create_engine(url)
        try:
            self.table = sa.Table(table, sa.MetaData(), autoload_with=self.engine)
        except sa.exc.NoSuchTableError:
            raise ValueError(f"source table {table!r} not found") from None
        missing = [c for c in (id_column, subject_column, vector_column) if c not in self.table.c]
        if missing:
            raise ValueError(
                f"source table {table!r} has no column(s) {missing}; it has {list(self.table.c.keys())}"
            )
        self.id_col = self.table.c[id_column]
        self.subject_col = self.table.c[subject_column]
        self.vector_col = self.table.c[vector_column]
        self.vector_format = vector_format
        safe_url = self.engine.url.render_as_string(hide_password=True)
        self.name = f"sql:{safe_url}#{table}.{vector_column}"

    def count(self) -> int:
        sa = self._sa
        with self.engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(self.table)).scalar_one()
            )

    def distinct_ids(self) -> int:
        sa = self._sa
        with self.engine.connect() as conn:
            q = sa.select(sa.func.count(sa.distinct(self.id_col)))
            return int(conn.execute(q).scalar_one())

    def chunks(self, size: int, after: Cursor = None) -> Iterator[Chunk]:
        sa = self._sa
        cols = (self.id_col, self.subject_col, self.vector_col)
        while True:
            q = sa.select(*cols).order_by(self.id_col).limit(size)
            if after is not None:
                q = q.where(self.id_col > after)
            with self.engine.connect() as conn:
                rows = self._fetch(conn, q)
            if not rows:
                return
            after = rows[-1][0]
            if not isinstance(after, int | str):  # e.g. a UUID: kept as text in the JSON cursor
                after = str(after)
            yield _page(
                [str(r[0]) for r in rows],
                [str(r[1]) for r in rows],
                [r[2] for r in rows],
                self.vector_format,
                after,
            )

    @staticmethod
    def _fetch(conn: Any, q: Any) -> Sequence[Sequence[Any]]:
        """A page of (id, subject, vector) rows. PostgreSQL: over the driver's binary protocol,
        so a bytea vector travels as its bytes, not as hex text twice its size that the
        server encodes and the client decodes (which cost more than the plain load of the
        same rows)."""
        if conn.dialect.name != "postgresql":
            return conn.execute(q).all()
        compiled = q.compile(dialect=conn.dialect)
        with conn.connection.driver_connection.cursor(binary=True) as cur:
            cur.execute(str(compiled), compiled.params)
            return cur.fetchall()

    def purge(self) -> str:
        """Set the vector column to NULL on every row; other columns stay the team's."""
        sa = self._sa
        try:
            with self.engine.begin() as conn:
                result = conn.execute(
                    sa.update(self.table)
                    .where(self.vector_col.is_not(None))
                    .values({self.vector_col.name: None})
                )
                n = result.rowcount
        except sa.exc.IntegrityError:
            raise ValueError(
                f"column {self.vector_col.name!r} of {self.table.name!r} is NOT NULL; "
                "drop the constraint (or the column) to let purge clear the raw vectors"
            ) from None
        note = ""
        if self.engine.dialect.name == "sqlite":
            # Deleted values linger in free pages of the file until VACUUM rewrites it.
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM")
            note = " and vacuumed the database file so the old pages are gone"
        elif self.engine.dialect.name == "postgresql":
            note = (
                f"; old row versions stay on disk until `VACUUM FULL {self.table.name}` "
                "(it locks the table, so run it when convenient)"
            )
        return f"set {self.vector_col.name} to NULL on {n} rows of {self.name}{note}"

    def close(self) -> None:
        self.engine.dispose()


def read_mapping(path: str | os.PathLike[str]) -> dict[str, str]:
    """Ids -> subjects from a CSV/TSV with a header `id,subject` or a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mapping file {path} not found")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a JSON mapping must be an object {{id: subject}}")
        return {str(k): str(v) for k, v in data.items()}
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None or not {"id", "subject"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: the header must name columns 'id' and 'subject'")
        return {row["id"]: row["subject"] for row in reader}


class _RowArraySource(Source):
    """Shared by file sources: vectors addressed by row number, the cursor is a row offset."""

    ids: np.ndarray
    subjects: np.ndarray

    def count(self) -> int:
        return len(self.ids)

    @abstractmethod
    def _rows(self, start: int, stop: int) -> np.ndarray: ...

    def chunks(self, size: int, after: Cursor = None) -> Iterator[Chunk]:
        start = int(after or 0)
        n = self.count()
        while start < n:
            stop = min(start + size, n)
            ids = [str(x) for x in self.ids[start:stop]]
            raw = np.asarray(self._rows(start, stop), np.float32)
            yield make_chunk(ids, [str(s) for s in self.subjects[start:stop]], raw, stop, [])
            start = stop


def _subjects_for(ids: np.ndarray, mapping: dict[str, str], what: str) -> np.ndarray:
    missing = [str(i) for i in ids if str(i) not in mapping]
    if missing:
        raise ValueError(
            f"the mapping file has no subject for {len(missing)} of {len(ids)} {what} ids "
            f"(first: {missing[:5]})"
        )
    return np.array([mapping[str(i)] for i in ids])


class _NpyStream:
    """Rows of a `.npy` stream (a file, or a member of an `.npz` zip) read by seek + read:
    only the rows asked for are ever in memory (no mmap either, whose touched pages would
    stay resident and make the memory bound a fiction)."""

    def __init__(self, f: BinaryIO, what: str) -> None:
        self.f = f
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(f)
        if len(shape) != 2 or fortran or dtype.kind != "f":
            raise ValueError(f"{what} must be a C-ordered float array [N, D]")
        self.n, self.dim = shape
        self.dtype = dtype
        self.offset = f.tell()

    def rows(self, start: int, stop: int) -> np.ndarray:
        row_bytes = self.dim * self.dtype.itemsize
        self.f.seek(self.offset + start * row_bytes)
        buf = self.f.read((stop - start) * row_bytes)
        return np.frombuffer(buf, dtype=self.dtype).reshape(stop - start, self.dim)

    def close(self) -> None:
        self.f.close()


class _NpySource(_RowArraySource):
    def __init__(
        self, path: str | os.PathLike[str], *, mapping: str | None = None, **_: Any
    ) -> None:
        self.path = Path(path)
        if mapping is None:
            raise ValueError("a .npy source needs --mapping (row number -> subject)")
        self._stream = _NpyStream(open(self.path, "rb"), str(self.path))
        self.ids = np.arange(self._stream.n)
        self.subjects = _subjects_for(self.ids, read_mapping(mapping), "row")
        self.name = f"npy:{self.path.resolve()}"

    def _rows(self, start: int, stop: int) -> np.ndarray:
        return self._stream.rows(start, stop)

    def close(self) -> None:
        self._stream.close()

    def purge(self) -> str:
        self.close()
        return _delete_file(self.path)


class _NpzSource(_RowArraySource):
    """Reads the vector array straight out of the zip member, chunk by chunk, instead of
    `np.load`, which would inflate the whole array in memory."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        vector_key: str = "embedding",
        id_key: str | None = "path",
        subject_key: str = "identity",
        **_: Any,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"source file {self.path} not found")
        with np.load(self.path, allow_pickle=False) as data:
            keys = set(data.files)
            for what, k in (("vector", vector_key), ("subject", subject_key)):
                if k not in keys:
                    raise ValueError(
                        f"{self.path} has no {what} array {k!r}; it has {sorted(keys)}"
                    )
            self.subjects = data[subject_key].astype(str)
            self.ids = (
                data[id_key].astype(str)
                if id_key and id_key in keys
                else np.arange(len(self.subjects))
            )
        self._zip = zipfile.ZipFile(self.path)
        self._stream = _NpyStream(self._zip.open(vector_key + ".npy"), f"{self.path}:{vector_key}")
        if self._stream.n != len(self.subjects):
            raise ValueError(
                f"{self.path}: {self._stream.n} vectors but {len(self.subjects)} subjects"
            )
        self.name = f"npz:{self.path.resolve()}#{vector_key}"

    def _rows(self, start: int, stop: int) -> np.ndarray:
        return self._stream.rows(start, stop)

    def close(self) -> None:
        self._stream.close()
        self._zip.close()

    def purge(self) -> str:
        self.close()
        return _delete_file(self.path)


class FaissSource(_RowArraySource):
    """A FAISS index with an id map (`IndexIDMap`/`IndexIDMap2` over a flat index) plus a
    mapping file of ids to subjects. The index is memory-mapped where FAISS allows it."""

    def __init__(
        self, path: str | os.PathLike[str], *, mapping: str | None = None, **_: Any
    ) -> None:
        import faiss

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"FAISS index {self.path} not found")
        if mapping is None:
            raise ValueError("a FAISS source needs --mapping (FAISS id -> subject)")
        try:
            loaded = faiss.read_index(str(self.path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            loaded = faiss.read_index(str(self.path))
        # `loaded` owns the C++ index: keep it alive as long as the downcast views of it.
        self._owner = loaded
        index = faiss.downcast_index(loaded)
        if not hasattr(index, "id_map"):
            raise ValueError(
                f"{self.path} has no id map ({type(index).__name__}); wrap it in IndexIDMap2 "
                "so vectors can be matched to ids"
            )
        self.index = index
        self.inner = faiss.downcast_index(index.index)
        self.ids = faiss.vector_to_array(index.id_map)
        try:
            self.inner.reconstruct_n(0, min(1, self.inner.ntotal))
        except RuntimeError:
            raise ValueError(
                f"{self.path}: {type(self.inner).__name__} cannot return its stored vectors; "
                "migrate from the original vectors instead"
            ) from None
        self.subjects = _subjects_for(self.ids, read_mapping(mapping), "FAISS")
        self.name = f"faiss:{self.path.resolve()}"

    def _rows(self, start: int, stop: int) -> np.ndarray:
        return self.inner.reconstruct_n(start, stop - start)

    def purge(self) -> str:
        del self.index, self.inner, self._owner
        return _delete_file(self.path)


def _delete_file(path: Path) -> str:
    size = path.stat().st_size
    path.unlink()
    return (
        f"deleted {path} ({size} bytes); on copy-on-write or flash storage, old blocks may "
        "survive until the file system reuses them"
    )


def open_source(
    spec: str,
    *,
    table: str | None = None,
    id_column: str | None = None,
    subject_column: str | None = None,
    vector_column: str | None = None,
    vector_format: VectorFormat = "auto",
    mapping: str | None = None,
) -> Source:
    """`--from` as given on the command line: a SQLAlchemy URL, or a .npy/.npz/FAISS file.

    For `.npz`, the column options name arrays (defaults: vectors `embedding`, ids `path`,
    subjects `identity`: the layout of the shipped embedding caches).
    """
    if "://" in spec:
        if not table:
            raise ValueError("a SQL source needs --table")
        return SqlTableSource(
            spec,
            table=table,
            id_column=id_column or "id",
            subject_column=subject_column or "subject",
            vector_column=vector_column or "embedding",
            vector_format=vector_format,
        )
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"source {spec} not found (give a SQLAlchemy URL or a file)")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _NpzSource(
            path,
            vector_key=vector_column or "embedding",
            id_key=id_column or "path",
            subject_key=subject_column or "identity",
        )
    if suffix == ".npy":
        return _NpySource(path, mapping=mapping)
    if suffix in (".faiss", ".index", ".idx"):
        return FaissSource(path, mapping=mapping)
    raise ValueError(f"{spec}: unknown source type (expected a URL, .npy, .npz or .faiss)")
