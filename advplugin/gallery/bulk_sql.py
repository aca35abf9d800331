"""The bulk statements of both dialects: a chunk of templates or subjects in ONE statement,
and the subject lookup a bulk write makes per chunk.

Why a module of its own: they are the hot path of a migration (millions of rows), tuned
against each database's planner and driver, and shared by the templates and subjects parts.
"""

from __future__ import annotations

from sqlalchemy import text

# PostgreSQL bulk insert of one chunk in one statement: the vectors travel as ONE bytea
# parameter (binary, no escaping) cut into rows by the server, the other per-row values as
# arrays, per-chunk values once. No per-row SQL text is built or parsed on either side.
PG_INSERT_TEMPLATES = text(
    """
    INSERT INTO templates (id, subject_id, collection_id, vector, dim, scheme, scheme_version,
        config_digest, key_id, extractor_name, extractor_version, image_sha256, image,
        created_at, updated_at)
    SELECT u.id, u.subject_id, :collection_id,
        substring(CAST(:vectors AS BYTEA) FROM CAST((u.n - 1) * :nbytes + 1 AS INTEGER)
                  FOR CAST(:nbytes AS INTEGER)),
        :dim, :scheme, :scheme_version, :config_digest, :key_id, :extractor_name,
        :extractor_version, u.image_sha256, u.image, :created_at, :updated_at
    FROM unnest(CAST(:id AS BIGINT[]), CAST(:subject_id AS BIGINT[]),
                CAST(:image_sha256 AS VARCHAR[]), CAST(:image AS BYTEA[]))
        WITH ORDINALITY AS u(id, subject_id, image_sha256, image, n)
    ORDER BY u.n
    """
)

# SQLite's counterpart (ids contiguous from :first, see `_next_ids`; json_each's key is the
# row's position).
SQLITE_INSERT_TEMPLATES = (
    "INSERT INTO templates (id, subject_id, collection_id, vector, dim, scheme, scheme_version, "
    "config_digest, key_id, extractor_name, extractor_version, created_at, updated_at) "
    "SELECT :first + j.key, j.value, :collection_id, substr(:vectors, j.key * :nbytes + 1, :nbytes), "
    ":dim, :scheme, :scheme_version, :config_digest, :key_id, :extractor_name, :extractor_version, "
    ":created_at, :updated_at FROM json_each(:subject_ids) AS j ORDER BY j.key"
)

SQLITE_INSERT_SUBJECTS = (
    "INSERT INTO subjects (id, collection_id, name, sealed_key, created_at) "
    "SELECT :first + j.key, :cid, j.value, "
    "CASE WHEN :width > 0 THEN substr(:keys, j.key * :width + 1, :width) END, :created_at "
    "FROM json_each(:names) AS j ORDER BY j.key"
)
# One unique-index probe per name, whatever the planner's statistics say: with `name IN
# (...)` a bulk load that outran autovacuum's ANALYZE got a plan that filtered every subject
# of the collection against the whole list, a cost that grew with the table (O(N^2) overall).
# The names travel as ONE JSON text (psycopg escapes a text array element by element,
# which cost more than the lookup).
PG_FIND_SUBJECTS = text(
    "SELECT n.name, s.id, s.sealed_key FROM json_array_elements_text(CAST(:names AS JSON)) AS n(name) "
    "CROSS JOIN LATERAL (SELECT id, sealed_key FROM subjects "
    "WHERE collection_id = :cid AND name = n.name) AS s"
)
# One unique-index probe per name, whatever the planner's statistics say: with `name IN
# (...)` a bulk load that outran autovacuum's ANALYZE got a plan that filtered every subject
# of the collection against the whole list, a cost that grew with the table (O(N^2) overall).
# The names travel as ONE JSON text (psycopg escapes a text array element by element,
# which cost more than the lookup).
PG_FIND_SUBJECTS = text(
    "SELECT n.name, s.id, s.sealed_key FROM json_array_elements_text(CAST(:names AS JSON)) AS n(name) "
    "CROSS JOIN LATERAL (SELECT id, sealed_key FROM subjects "
    "WHERE collection_id = :cid AND name = n.name) AS s"
)
