"""Bulk jobs over a whole gallery: migration of an existing raw feature database into a
protected gallery, verification of such a migration, and key rotation of stored templates
without raw embeddings. See docs/migration.md.

Named `bulk` (it was `advplugin.migration`) so that it cannot be confused with
`advplugin.migrations`, the Alembic revisions of the gallery's schema."""

from advplugin.bulk.pipeline import (
    MigrationResult,
    ValidationReport,
    job_name,
    load_job,
    migrate,
    set_job_state,
    validate_source,
)
from advplugin.bulk.rotate import RotationResult, plan_rotation, rotate_key
from advplugin.bulk.sources import (
    Chunk,
    FaissSource,
    Source,
    SqlTableSource,
    open_source,
    read_mapping,
)
from advplugin.bulk.verify import VerifyReport, verify_migration

__all__ = [
    "Chunk",
    "FaissSource",
    "MigrationResult",
    "RotationResult",
    "Source",
    "SqlTableSource",
    "ValidationReport",
    "VerifyReport",
    "job_name",
    "load_job",
    "migrate",
    "open_source",
    "plan_rotation",
    "read_mapping",
    "rotate_key",
    "set_job_state",
    "validate_source",
    "verify_migration",
]
