"""Reads of stored examples (one template and its subject's name) that CompreFace's API asks
for and the gallery's own methods do not answer: one example by template id, a page of a
collection's examples. Plain functions over the gallery's `Database` handle and the models,
each self-contained, so that they can be folded into the gallery's parts; they read ids and names
only, never a vector, so nothing here touches sealed storage.

They live in the gallery, not in the routes, so that no route module holds SQL (an
import-linter contract: no `advplugin.service.routes` module imports SQLAlchemy).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sqlalchemy import Select, func, select

from advplugin.gallery.database import Database
from advplugin.gallery.models import Subject, Template


class Example(NamedTuple):
    """A stored template as CompreFace names it: its id (the image id) and its subject."""

    template_id: int
    subject: str


class ExamplePage(NamedTuple):
    """One page of examples, in template id order, and how many there are in all."""

    examples: list[Example]
    total: int


def examples_query() -> Select[Any]:
    """(template id, subject name) of every template, to narrow with `.where`; shared with
    `advplugin.bulk.lookup`, which finds a template by the id its source row had."""
    return select(Template.id, Subject.name).join(Subject, Subject.id == Template.subject_id)


def first_example(db: Database, query: Select[Any]) -> Example | None:
    """The first row of a narrowed `examples_query()` (None: no row)."""
    with db.read() as conn:
        row = conn.execute(query.limit(1)).first()
    return None if row is None else Example(int(row[0]), str(row[1]))


def example(db: Database, collection: str, template_id: int) -> Example | None:
    """The example with this template id in `collection` (None: none there)."""
    cid = db.collection_id(collection)
    return first_example(db, examples_query().where(Template.id == template_id, Template.collection_id == cid))


def list_examples(
    db: Database, collection: str, subject: str | None, offset: int, limit: int
) -> ExamplePage:
    """Examples of `collection` (of one subject when `subject` is given), `limit` from
    `offset` in template id order, with their total; both read in one snapshot."""
    cid = db.collection_id(collection)
    q = examples_query().where(Template.collection_id == cid)
    if subject is not None:
        q = q.where(Subject.name == subject)
    with db.read() as conn:
        total = int(conn.scalar(select(func.count()).select_from(q.subquery())) or 0)
        rows = conn.execute(q.order_by(Template.id).offset(offset).limit(limit)).all()
    return ExamplePage([Example(int(i), str(n)) for i, n in rows], total)


__all__ = ["Example", "ExamplePage", "example", "examples_query", "first_example", "list_examples"]
