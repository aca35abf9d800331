"""Alembic revisions of the gallery database (one file per revision)."""
