"""Batch migration of existing raw feature databases into protected galleries, and key
rotation of stored galleries without raw embeddings. See docs/migration.md."""

from advplugin.migration.pipeline import (
    MigrationResult,
    ValidationReport,
    job_name,
    load_job,
    migrate,
    set_job_state,
    validate_source,
)
from advplugin.migration.rotate import KeyRing, RotationResult, plan_rotation, rotate_key
from advplugin.migration.sources import (
    Chunk,
    FaissSource,
    Source,
    SqlTableSource,
    open_source,
    read_mapping,
)
from advplugin.migration.verify import VerifyReport, verify_migration

__all__ = [
    "Chunk",
    "FaissSource",
    "KeyRing",
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
