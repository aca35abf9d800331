"""`--verify`: does the protected gallery answer like the raw source did?

Sample probes from the source; for each, find the top-k nearest entries (leaving the probe's
own row out) once by raw cosine search over the source and once by protected search over
the migrated templates (the probe protected with the same key). Agreement is the fraction of
probes whose rank-1 identity is the same, which is exactly the offline raw-vs-protected
rank-1 agreement over the same probes; top-k overlap is reported beside it. Counts are
checked too: every source row must be in the gallery exactly once.

Both searches stream (source chunks, gallery chunks) against a running top-k, so verifying
a million-row migration needs memory for the probes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

from advplugin.bulk.models import MigrationChunk, MigrationItem
from advplugin.bulk.pipeline import unpack_source_ids
from advplugin.bulk.sources import Source
from advplugin.gallery import Gallery
from advplugin.gallery.models import Template
from advplugin.protectors import Protector
from advplugin.protectors.base import l2_normalize


class TopK:
    """Running top-k (score, label) per probe over streamed candidate chunks."""

    def __init__(self, n_probes: int, k: int) -> None:
        self.k = k
        self.scores = np.full((n_probes, k), -np.inf, np.float32)
        self.labels = np.full((n_probes, k), None, dtype=object)

    def update(
        self, scores: np.ndarray, labels: Sequence[object], exclude: np.ndarray | None = None
    ) -> None:
        """`scores` [P, c]; `exclude` [P, c] bool marks pairs that must not count (self)."""
        scores = np.asarray(scores, np.float32)
        if exclude is not None:
            scores = np.where(exclude, -np.inf, scores).astype(np.float32)
        if scores.shape[1] > self.k:
            part = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
            scores = np.take_along_axis(scores, part, axis=1)
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        cand_labels = np.asarray(labels, dtype=object)[part]
        all_scores = np.hstack([self.scores, scores])
        all_labels = np.hstack([self.labels, cand_labels])
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(all_scores, order, axis=1)
        self.labels = np.take_along_axis(all_labels, order, axis=1)


@dataclass
class VerifyReport:
    probes: int
    top_k: int
    source_rows: int
    migrated_rows: int  # item rows of the job
    distinct_migrated: int  # distinct source ids among them
    templates_present: int  # of the job's templates still in the gallery
    rank1_agreement: float
    topk_overlap: float
    raw_rank1: float  # rank-1 identification rate with raw search (self left out)
    protected_rank1: float
    min_agreement: float
    probe_ids: list[str]
    raw_top1: list[str]
    protected_top1: list[str]

    @property
    def counts_ok(self) -> bool:
        return (
            self.migrated_rows
            == self.source_rows
            == self.distinct_migrated
            == self.templates_present
        )

    @property
    def passed(self) -> bool:
        return self.counts_ok and self.probes > 0 and self.rank1_agreement >= self.min_agreement

    def render(self) -> str:
        lines = [
            f"rows: source {self.source_rows}, migrated {self.migrated_rows} "
            f"({self.distinct_migrated} distinct), templates present {self.templates_present}"
            f" -> {'ok' if self.counts_ok else 'MISMATCH'}",
            f"probes: {self.probes}, top-{self.top_k}",
            f"rank-1 identity agreement raw vs protected: {self.rank1_agreement:.4f} "
            f"(required {self.min_agreement:.4f})",
            f"top-{self.top_k} identity overlap: {self.topk_overlap:.4f}",
            f"rank-1 identification: raw {self.raw_rank1:.4f}, protected {self.protected_rank1:.4f}",
            f"verify: {'PASSED' if self.passed else 'FAILED'}",
        ]
        return "\n".join(lines)


def _sample_probes(
    source: Source, n: int, chunk_size: int, seed: int
) -> tuple[list[str], list[str], np.ndarray]:
    total = source.count()
    pick = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    ids: list[str] = []
    subjects: list[str] = []
    vecs: list[np.ndarray] = []
    offset = 0
    for chunk in source.chunks(chunk_size):
        lo, hi = np.searchsorted(pick, [offset, offset + len(chunk)])
        for p in pick[lo:hi]:
            j = int(p - offset)
            ids.append(chunk.ids[j])
            subjects.append(chunk.subjects[j])
            vecs.append(chunk.vectors[j])
        offset += len(chunk)
    dim = vecs[0].shape[0] if vecs else 0
    return ids, subjects, np.array(vecs, np.float32).reshape(len(vecs), dim)


def verify_migration(
    source: Source,
    gallery: Gallery,
    protector: Protector,
    *,
    job_id: int,
    collection: str,
    samples: int = 1000,
    top_k: int = 5,
    chunk_size: int = 10_000,
    min_agreement: float = 0.99,
    seed: int = 0,
) -> VerifyReport:
    probe_ids, probe_subjects, raw = _sample_probes(source, samples, chunk_size, seed)
    row_of = {pid: i for i, pid in enumerate(probe_ids)}

    # Raw search over the source.
    raw_top = TopK(len(probe_ids), top_k)
    raw_probes = l2_normalize(raw) if len(raw) else raw
    for chunk in source.chunks(chunk_size):
        if not len(chunk):
            continue
        scores = raw_probes @ l2_normalize(chunk.vectors).T
        raw_top.update(scores, chunk.subjects, _self_mask(row_of, chunk.ids, len(probe_ids)))

    # Protected search over the job's templates in the gallery.
    job = _job_rows(gallery, job_id, probe_ids)
    job_templates, own_template = job.templates, job.own
    prot_top = TopK(len(probe_ids), top_k)
    probes = protector.protect(raw) if len(raw) else raw
    del raw, raw_probes
    template_row = {t: row_of[s] for s, t in own_template.items()}
    for batch in gallery.iter_templates(collection=collection, chunk_size=chunk_size):
        keep = np.isin(batch.ids, job_templates)
        if not keep.any():
            continue
        ids = batch.ids[keep]
        labels = [s for s, k in zip(batch.subjects, keep, strict=True) if k]
        scores = protector.score(probes, batch.vectors[keep])
        prot_top.update(scores, labels, _self_mask(template_row, ids.tolist(), len(probe_ids)))

    subjects = np.asarray(probe_subjects, dtype=object)
    raw1, prot1 = raw_top.labels[:, 0], prot_top.labels[:, 0]
    overlap = [
        len(set(a) & set(b)) / max(len(set(a)), 1)
        for a, b in zip(raw_top.labels, prot_top.labels, strict=True)
    ]
    n = len(probe_ids)
    return VerifyReport(
        probes=n,
        top_k=top_k,
        source_rows=source.count(),
        migrated_rows=job.rows,
        distinct_migrated=job.distinct,
        templates_present=len(job_templates),
        rank1_agreement=float((raw1 == prot1).mean()) if n else 0.0,
        topk_overlap=float(np.mean(overlap)) if n else 0.0,
        raw_rank1=float((raw1 == subjects).mean()) if n else 0.0,
        protected_rank1=float((prot1 == subjects).mean()) if n else 0.0,
        min_agreement=min_agreement,
        probe_ids=probe_ids,
        raw_top1=[str(x) for x in raw1],
        protected_top1=[str(x) for x in prot1],
    )


def _self_mask(row_of: dict, ids: list, n_probes: int) -> np.ndarray:
    """[P, c] True where candidate j is probe p itself."""
    mask = np.zeros((n_probes, len(ids)), bool)
    for j, i in enumerate(ids):
        p = row_of.get(i)
        if p is not None:
            mask[p, j] = True
    return mask


@dataclass
class _JobRows:
    rows: int  # source rows the job recorded
    distinct: int  # distinct source ids among them
    templates: np.ndarray  # sorted ids of the job's templates that still exist
    own: dict[str, int]  # probe source id -> its template id


def job_items(gallery: Gallery, job_id: int) -> dict[str, int]:
    """{source id: template id} of every row the job recorded (whatever table holds it)."""
    return _job_rows(gallery, job_id, None).own


def _job_rows(gallery: Gallery, job_id: int, probe_ids: list[str] | None) -> _JobRows:
    """What the job recorded: its `migration_chunks` (a contiguous template id block and the
    chunk's source ids in order) and its per-row `migration_items` (jobs before revision
    0009, and chunks whose source ids a client may hold); a chunk is in one or the other.
    Source ids are counted as 64-bit hashes (8 bytes a row, whatever the ids' length).
    `own` maps the probes' ids (`probe_ids` None: every id)."""
    wanted = None if probe_ids is None else set(probe_ids)
    own: dict[str, int] = {}
    hashes: list[np.ndarray] = []
    templates: list[np.ndarray] = []
    rows = 0

    def add(sids: list[str], tids: Sequence[int]) -> None:
        nonlocal rows
        rows += len(sids)
        hashes.append(np.fromiter(map(hash, sids), np.int64, len(sids)))
        own.update({s: int(t) for s, t in zip(sids, tids, strict=True) if wanted is None or s in wanted})

    with gallery.engine.connect() as conn:
        items = conn.execute(
            select(MigrationItem.source_id, MigrationItem.template_id).where(MigrationItem.job_id == job_id)
        )
        for part in items.partitions(10_000):
            add([s for s, _ in part], [t for _, t in part])
        present = select(Template.id).join(MigrationItem, MigrationItem.template_id == Template.id).where(
            MigrationItem.job_id == job_id
        )
        templates.append(np.fromiter((int(t) for t in conn.scalars(present)), np.int64))
        chunks = conn.execute(
            select(MigrationChunk.first_template_id, MigrationChunk.last_template_id, MigrationChunk.source_ids)
            .where(MigrationChunk.job_id == job_id, MigrationChunk.source_ids.is_not(None))
            .order_by(MigrationChunk.seq)
        )
        for first, last, blob in chunks:
            sids = unpack_source_ids(blob)
            add(sids, range(int(first), int(first) + len(sids)))
            q = select(Template.id).where(Template.id.between(int(first), int(last)))
            templates.append(np.fromiter((int(t) for t in conn.scalars(q)), np.int64))
    distinct = len(np.unique(np.concatenate(hashes))) if hashes else 0
    return _JobRows(rows, distinct, np.sort(np.concatenate(templates)), own)
