"""The collections a service serves: writes, the index that follows them, and matching.

Every write goes through here, so the index is always caught up before the response: SQL
commits first (with its change-log rows), then the collection's index replays them. Routes
never write to the gallery themselves and then have to remember to update the index; after a
crash between the two, the restart replays the change log (nothing lost, nothing revived).

Key rotation is followed here too (`keys`): the service reads the change log the index
replays, so it notices a rotation running in another process, and its end, without scans.

The reads and scores that CompreFace's API needs beyond the native one (examples by image id,
pages of examples, scores against one stored template or between two uploads) are here too,
so that its routes, like the native ones, only parse, call this and shape the answer.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from advplugin.bulk.lookup import migrated_example
from advplugin.gallery import Gallery, SubjectNotFound, reads
from advplugin.gallery.audit import Actor
from advplugin.gallery.budgets import AnswerBudgets
from advplugin.gallery.index import IndexFollower, TemplateIndex
from advplugin.gallery.matcher import Match, Matcher, ProbeSet
from advplugin.gallery.names import name_beside
from advplugin.gallery.reads import Example, ExamplePage
from advplugin.service.errors import ServiceError
from advplugin.service.protection import KeyView, Protection
from advplugin.service.startup import key_mismatch_message
from advplugin.settings import Settings

log = logging.getLogger("advplugin.service")


@dataclass
class _KeyWatch:
    """Key ids that have templates in a collection, as of change-log entry `seq` (a superset:
    ids whose last template went are dropped when next checked)."""

    seq: int
    key_ids: set[str | None] = field(default_factory=set)


class CollectionService:
    def __init__(self, gallery: Gallery, protection: Protection, settings: Settings) -> None:
        self.gallery = gallery
        self.protection = protection
        self.settings = settings
        self._indexes: dict[str, TemplateIndex] = {}
        self._watch: dict[str, _KeyWatch] = {}
        self._lock = threading.Lock()
        self._keys_lock = threading.Lock()
        self._follower: IndexFollower | None = None

    # -- indexes ---------------------------------------------------------------------------------
    def index(self, collection: str) -> TemplateIndex:
        """The collection's index, loaded from its snapshot (or rebuilt) on first use."""
        with self._lock:
            if collection not in self._indexes:
                s = self.settings
                cid = self.gallery.collection_id(collection)
                index = TemplateIndex(
                    self.gallery, self.protection.expected.output_dim, collection=collection,
                    config=s.index,
                    snapshot_path=s.resolved_index_dir / f"collection-{cid}-{s.index.kind}.npz",
                )
                # The change-log position first, then the key ids: a change in between is
                # looked at again by `keys` (harmless), never missed.
                watch = _KeyWatch(seq=self.gallery.last_change_seq(collection=collection))
                watch.key_ids = {r["key_id"] for r in self.gallery.provenance(collection=collection)}
                # Persist only what the snapshot lacks: a rebuild or replayed changes.
                if not index.load() or index.changes_since_snapshot:
                    index.save()
                if self._follower is None and s.index.sync_interval > 0:
                    self._follower = IndexFollower(self.gallery, s.index.sync_interval)
                if self._follower is not None:  # other processes' writes, off the request path
                    self._follower.add(index)
                self._watch[collection] = watch
                self._indexes[collection] = index
            return self._indexes[collection]

    def open_all(self) -> None:
        for name in self.gallery.collections():
            self.index(name)

    def close(self) -> None:
        """Snapshot every index (a faster next start; SQL stays the truth)."""
        if self._follower is not None:
            self._follower.close()
            self._follower = None
        for index in self._indexes.values():
            try:
                index.save()
            except OSError as e:
                log.warning("could not write index snapshot: %s", type(e).__name__)

    def _caught_up(self, collection: str) -> None:
        """Bring the index up to date with what was just committed, snapshot now and then."""
        index = self.index(collection)
        index.catch_up()
        index.maybe_save(self.settings.snapshot_every)

    # -- writes ------------------------------------------------------------------------------------
    def enroll(
        self,
        collection: str,
        subjects: Sequence[str],
        templates: np.ndarray,
        *,
        extractor_version: str | None = None,
        image_sha256: Sequence[str | None] | None = None,
        images: Sequence[bytes | None] | None = None,
        actor: Actor | None = None,
    ) -> list[int]:
        """Store protected templates of the served scheme and key; searchable on return.
        With `actor`, one audit event per subject commits in the same transaction."""
        p = self.protection
        with self.gallery.transaction() as g:
            ids = g.add_templates(
                subjects, templates, protection=p.expected,
                extractor_name=p.extractor_name, extractor_version=extractor_version or p.extractor_version,
                collection=collection, image_sha256=image_sha256, images=images,
            )
            if actor is not None:
                for name, count in Counter(subjects).items():
                    g.record_audit(actor, "enroll", collection=collection, subject=name, template_count=count)
        self._caught_up(collection)
        return ids

    def delete_subject(self, collection: str, name: str, *, actor: Actor | None = None) -> int:
        """Delete a subject and its templates (SubjectNotFound if absent); unsearchable on
        return. With `actor`, the audit event commits in the deletion's transaction."""
        with self.gallery.transaction() as g:
            n = self._delete_in(g, collection, name)
            if actor is not None:
                g.record_audit(actor, "delete_subject", collection=collection, subject=name, template_count=n)
        self.gallery.complete_erasures_or_warn()  # its erasure key: every older copy of the database loses it
        self._erased(collection)
        return n

    def rename_subject(self, collection: str, old: str, new: str, *, actor: Actor | None = None) -> bool:
        """Rename `old` to `new`, merging into `new` when it exists (CompreFace's semantics);
        False when the names are equal (nothing changes), SubjectNotFound when `old` is absent,
        ServiceError 503 `key_rotation` while any of its templates is under another key.

        ONE serialised write transaction: the existence check, the read of the old subject's
        protected templates, their re-enrolment under `new` (new template ids; no raw
        embedding involved), the old subject's deletion (crypto-shredded like any delete) and
        the audit events. A delete, enrol or other rename takes the same lock, so none can
        interleave: a delete that answered never leaves a template under the new name, two
        renames never both copy, and an answered rename is committed whole."""
        p = self.protection
        with self.gallery.transaction() as g:
            g.get_subject(old, collection=collection)  # SubjectNotFound
            if old == new:
                return False
            ids = g.subject_template_ids(old, collection=collection)
            rows = g.template_rows(ids)
            if any(r.key_id != p.expected.key_id for r in rows.values()):
                raise ServiceError(503, "key_rotation", "a key rotation is in progress: rename after it finished")
            kept = [i for i in ids if i in rows]
            created = False
            if kept:
                vectors = np.stack([np.asarray(rows[i].vector, np.float32) for i in kept])
                g.add_templates(
                    [new] * len(kept), vectors, protection=p.expected,
                    extractor_name=p.extractor_name, extractor_version=p.extractor_version,
                    collection=collection,
                )
            else:  # a subject without templates is renamed too
                created = g.add_subject(new, collection=collection)
            n = self._delete_in(g, collection, old)
            if actor is not None:
                if kept:
                    g.record_audit(actor, "enroll", collection=collection, subject=new, template_count=len(kept))
                elif created:
                    g.record_audit(actor, "add_subject", collection=collection, subject=new, template_count=0)
                g.record_audit(actor, "delete_subject", collection=collection, subject=old, template_count=n)
        self.gallery.complete_erasures_or_warn()  # the old subject's erasure key, as in `delete_subject`
        self._erased(collection)
        return True

    def complete_subject_renames(self) -> None:
        """The renames to canonical names that the upgrade to revision 0011 planned
        (`SubjectRename`), each through `rename_subject`: one serialised transaction that
        re-seals the templates under the new name (a sealed subject's key is bound to its
        name), audited as the service's. Idempotent: a rename done before a crash finds the old
        name gone. A name taken since the upgrade is not merged into: the subject takes
        "<name> (subject <id>)". During a key rotation the rename waits for the next start."""
        renames = self.gallery.subject_renames()
        if not renames:
            return
        names = {self.gallery.collection_id(c, create=False): c for c in self.gallery.collections()}
        for r in renames:
            collection = names[r.collection_id]
            new = name_beside(r.new_name, r.subject_id, lambda n, c=collection: _exists(self.gallery, c, n))
            try:
                self.rename_subject(collection, r.old_name, new, actor=Actor("service"))
            except SubjectNotFound:
                pass  # renamed before a crash, or deleted since
            except ServiceError as e:
                print(f"advplugin: WARNING: subject {r.subject_id} keeps its non-canonical name for now: {e.message}",
                      flush=True)
                continue
            else:
                print(f"advplugin: renamed subject {r.subject_id} of collection {collection!r} from "
                      f"{r.old_name!r} to its canonical name {new!r}", flush=True)
            self.gallery.forget_subject_rename(r.subject_id)

    @staticmethod
    def _delete_in(g: Gallery, collection: str, name: str) -> int:
        """Delete a subject inside the caller's transaction `g`, with every key's record of
        it (`AnswerBudgets.forget_subject`): a deleted person's name must not outlive it."""
        n = g.delete_subject(name, collection=collection)
        AnswerBudgets(g).forget_subject(collection, name)
        return n

    def _erased(self, collection: str) -> None:
        """After a delete committed: unsearchable on return, and (docs/sealed-storage.md) the
        snapshot that held the rows is rewritten now (overwriting the old file), and SQLite's
        WAL, whose older frames still hold them, is checkpointed into the (secure-delete,
        zeroed) database."""
        self._caught_up(collection)
        self.index(collection).save()
        self.gallery.checkpoint()

    def add_subject(self, collection: str, name: str, *, actor: Actor | None = None) -> bool:
        """Create a subject without templates (nothing for the index to follow); False when
        it exists. With `actor`, the audit event commits with it."""
        with self.gallery.transaction() as g:
            created = g.add_subject(name, collection=collection)
            if created and actor is not None:
                g.record_audit(actor, "add_subject", collection=collection, subject=name, template_count=0)
        return created

    def delete_templates(
        self, collection: str, templates: dict[int, str], *, actor: Actor | None = None
    ) -> int:
        """Delete single templates ({template id: its subject}, ids of `collection` only: the
        caller looked them up there); unsearchable on return, erased like `delete_subject`.
        The subjects stay, possibly without templates (CompreFace's delete-by-image-id)."""
        with self.gallery.transaction() as g:
            n = g.delete_templates(list(templates))
            if actor is not None:
                for name, count in Counter(templates.values()).items():
                    g.record_audit(actor, "delete_templates", collection=collection, subject=name,
                                   template_count=count)
        self._erased(collection)
        return n

    def delete_examples(self, collection: str, subject: str | None, *, actor: Actor | None = None) -> int:
        """Delete every template of `subject`, or, with None, of every subject of the collection;
        the subjects stay, without templates (CompreFace's "delete all examples"). An absent
        subject has nothing to delete: 0, not SubjectNotFound."""
        names = [subject] if subject is not None else self.subject_names(collection)
        deleted = 0
        for name in names:
            ids = self.gallery.subject_template_ids(name, collection=collection)  # [] if absent
            if ids:
                deleted += self.delete_templates(collection, dict.fromkeys(ids, name), actor=actor)
        return deleted

    def delete_all_subjects(self, collection: str, *, actor: Actor | None = None) -> int:
        """Delete every subject of the collection, each in its own transaction like
        `delete_subject`; one deleted meanwhile is skipped. How many this call deleted."""
        deleted = 0
        for name in self.subject_names(collection):
            try:
                self.delete_subject(collection, name, actor=actor)
            except SubjectNotFound:  # deleted meanwhile
                continue
            deleted += 1
        return deleted

    # -- reads of examples (CompreFace's image ids) ------------------------------------------------
    def subject_names(self, collection: str) -> list[str]:
        """Every subject's name, in the gallery's order, read a page of 1000 at a time."""
        names: list[str] = []
        while True:
            page = self.gallery.list_subjects(collection=collection, offset=len(names), limit=1000)
            names += [r.name for r in page]
            if len(page) < 1000:
                return names

    def example(self, collection: str, image_id: str) -> Example | None:
        """The example an image id names in this collection: a template id, or the id a row had
        in the database it was migrated from (`advplugin migrate --from-compreface` records it,
        so image ids kept by clients still work). None when it names none."""
        if not image_id or "\x00" in image_id:  # never stored (PostgreSQL refuses NUL in a query)
            return None
        if image_id.isascii() and image_id.isdigit() and len(image_id) < 19:  # fits a BIGINT
            return reads.example(self.gallery.db, collection, int(image_id))
        return migrated_example(self.gallery.db, collection, image_id)

    def examples(self, collection: str, subject: str | None, *, offset: int, limit: int) -> ExamplePage:
        """A page of the collection's examples (of one subject when given), by template id."""
        return reads.list_examples(self.gallery.db, collection, subject, offset, limit)

    # -- keys of a collection (key rotation) -----------------------------------------------------
    def keys(self, collection: str) -> KeyView:
        """Which keys the collection's templates are under, up to what its index holds.

        Cheap per request: only change-log entries not yet looked at are read (which key ids
        did they touch?), plus one indexed existence probe per key id other than the
        current one (has its last template gone: rotation finished, subjects deleted?).
        """
        index = self.index(collection)
        p = self.protection
        with self._keys_lock:
            watch = self._watch[collection]
            current = p.expected.key_id
            dropped = False
            for kid in [k for k in watch.key_ids if k != current]:
                if not self.gallery.has_templates(key_id=kid, collection=collection):
                    watch.key_ids.discard(kid)
                    dropped = True
            if dropped:
                index.catch_up()  # the index must not hold vectors under a dropped key
            else:
                index.sync()
            if index.last_seq > watch.seq:
                watch.key_ids |= self.gallery.key_ids_changed(watch.seq, index.last_seq, collection=collection)
                watch.seq = index.last_seq
            previous = p.previous
            old = previous.metadata.key_id if previous is not None else None
            if previous is not None and old not in watch.key_ids:
                if not self.gallery.has_templates(key_id=old, collection=None):
                    p.retire_previous()
                previous = None
            unknown = sorted((k for k in watch.key_ids if k not in (current, old)), key=str)
            return KeyView(current=current, previous=previous, unknown=unknown)

    # -- matching ----------------------------------------------------------------------------------
    def matcher(self, view: KeyView, collection: str) -> Matcher:
        return Matcher(
            self.gallery, self.index(collection), self.protection.scorers(view),
            collection=collection, candidates=self.settings.match_candidates,
        )

    def identify(
        self, view: KeyView, collection: str, probes: ProbeSet, *, k: int, threshold: float | None
    ) -> list[list[Match]]:
        return self.matcher(view, collection).identify(probes, k=k, threshold=threshold)

    def verify(self, view: KeyView, collection: str, probes: ProbeSet, subject: str) -> Match:
        return self.matcher(view, collection).verify(probes, subject)

    def score_template(self, view: KeyView, probes: ProbeSet, template_id: int) -> list[float] | None:
        """Scores of probes against one stored template (verification by image id), with the
        scorer of the key it is under; None when it was deleted meanwhile. 503 `key_rotation`
        when this service holds no scorer, or no probe, under that key."""
        row = self.gallery.template_rows([template_id]).get(template_id)
        if row is None:
            return None
        scorer = self.protection.scorers(view).get(row.key_id)
        if scorer is None or row.key_id not in probes:
            raise ServiceError(503, "key_rotation", key_mismatch_message(self.protection, self.settings, [row.key_id]))
        return [float(s) for s in scorer(probes[row.key_id], np.asarray(row.vector, np.float32)[None, :])[:, 0]]

    def compare(self, view: KeyView, targets: np.ndarray, source: np.ndarray) -> list[float]:
        """Scores of each of `targets` against `source` ([1, dim]), both protected under the
        view's current key, with the scorer identification uses: two uploaded images compared
        (no stored template, hence no collection, is involved)."""
        scorer = self.protection.scorers(view)[view.current]
        return [float(s) for s in scorer(targets, source)[:, 0]]


def _exists(gallery: Gallery, collection: str, name: str) -> bool:
    try:
        gallery.get_subject(name, collection=collection)
    except SubjectNotFound:
        return False
    return True
