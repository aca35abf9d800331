"""Which stored example a row of a migrated database became, by the id the row had there.

`advplugin migrate --from-compreface` records each source row's id (`MigrationItem`), so
image ids that CompreFace clients kept still name the same example after the migration. The
lookup joins the migration-job tables, which belong to `bulk`: the gallery below it cannot
read them, and the routes above it hold no SQL.
"""

from __future__ import annotations

from advplugin.bulk.models import MigrationItem, MigrationJob
from advplugin.gallery.database import Database
from advplugin.gallery.models import Template
from advplugin.gallery.reads import Example, examples_query, first_example


def migrated_example(db: Database, collection: str, source_id: str) -> Example | None:
    """The example that the source row `source_id` became in `collection` (None: no
    migration into this collection had a row of that id, or its template is gone)."""
    cid = db.collection_id(collection)
    return first_example(db, (
        examples_query()
        .join(MigrationItem, MigrationItem.template_id == Template.id)
        .join(MigrationJob, MigrationJob.id == MigrationItem.job_id)
        .where(MigrationItem.source_id == source_id, MigrationJob.collection_id == cid,
               Template.collection_id == cid)
    ))


__all__ = ["migrated_example"]
