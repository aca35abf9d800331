"""CompreFace's and deepface's PostgreSQL schemas, written from their published migrations,
filled with lfw-dev dlib embeddings the way each project stores them.

CompreFace: Liquibase `java/admin/src/main/resources/db/changelog/db.changelog-0.0.4.yaml`
(`model`), `-0.1.7.yaml` (`subject`, `img`, `embedding`), `type` of a model from later ones
(R: recognition); `app` reduced to the columns `model` refers to. deepface:
`deepface/modules/database/postgres.py` (`embeddings`, `embeddings_index`). This PostgreSQL
has no pgvector extension, so deepface's pgvector table (`vector(D)`, whose text form is
`[x,y,...]`) is stood in for by a TEXT column holding that same text.
"""

from __future__ import annotations

import hashlib
import json
import uuid

import numpy as np
import sqlalchemy as sa

COMPREFACE_DDL = """
CREATE TABLE app (id bigint PRIMARY KEY, name varchar(255) NOT NULL, guid varchar(36) NOT NULL UNIQUE,
                  api_key varchar(36));
CREATE TABLE model (id bigint, name varchar(255) NOT NULL, guid varchar(36) NOT NULL, app_id bigint NOT NULL,
                    api_key varchar(36) NOT NULL, type varchar(1),
                    CONSTRAINT pk_model PRIMARY KEY (id),
                    CONSTRAINT app_name_app_id_uindex UNIQUE (name, app_id),
                    CONSTRAINT model_api_key_uindex UNIQUE (api_key),
                    CONSTRAINT model_guid_uindex UNIQUE (guid),
                    CONSTRAINT fk_app_id FOREIGN KEY (app_id) REFERENCES app (id) ON DELETE CASCADE ON UPDATE CASCADE);
CREATE SEQUENCE model_id_seq;
CREATE TABLE subject (id uuid, api_key varchar(36), subject_name varchar(255),
                      CONSTRAINT pk_subject PRIMARY KEY (id),
                      CONSTRAINT api_key_subject_name_uindex UNIQUE (api_key, subject_name));
CREATE TABLE img (id uuid, content bytea NOT NULL, CONSTRAINT pk_img PRIMARY KEY (id));
CREATE TABLE embedding (id uuid, subject_id uuid, embedding float8[] NOT NULL, calculator varchar(255) NOT NULL,
                        img_id uuid,
                        CONSTRAINT pk_embedding PRIMARY KEY (id),
                        CONSTRAINT fk_subject_id FOREIGN KEY (subject_id) REFERENCES subject (id)
                            ON DELETE CASCADE ON UPDATE CASCADE,
                        CONSTRAINT fk_img_id FOREIGN KEY (img_id) REFERENCES img (id));
"""

DEEPFACE_DDL = """
CREATE TABLE IF NOT EXISTS embeddings (
    id BIGSERIAL PRIMARY KEY, img_name TEXT NOT NULL, face BYTEA NOT NULL, face_shape INT[] NOT NULL,
    model_name TEXT NOT NULL, detector_backend TEXT NOT NULL, aligned BOOLEAN DEFAULT true,
    l2_normalized BOOLEAN DEFAULT false, embedding FLOAT8[] NOT NULL, created_at TIMESTAMPTZ DEFAULT now(),
    face_hash TEXT NOT NULL, embedding_hash TEXT NOT NULL, UNIQUE (face_hash, embedding_hash));
CREATE TABLE IF NOT EXISTS embeddings_index (
    id SERIAL PRIMARY KEY, model_name TEXT, detector_backend TEXT, align BOOL, l2_normalized BOOL,
    index_data BYTEA, created_at TIMESTAMPTZ DEFAULT now(), updated_at TIMESTAMPTZ DEFAULT now(),
    UNIQUE (model_name, detector_backend, align, l2_normalized));
"""

#: The pgvector table deepface makes for (Dlib, dlib, aligned, raw), its `vector(128)` as TEXT.
DEEPFACE_PGVECTOR_STANDIN = """
CREATE TABLE IF NOT EXISTS embeddings_dlib_dlib_aligned_raw (
    id SERIAL PRIMARY KEY, img_name TEXT NOT NULL, face BYTEA NOT NULL, face_shape INT[] NOT NULL,
    model_name TEXT NOT NULL, detector_backend TEXT NOT NULL, aligned BOOLEAN DEFAULT true,
    l2_normalized BOOLEAN DEFAULT false, embedding TEXT NOT NULL, created_at TIMESTAMPTZ DEFAULT now(),
    face_hash TEXT NOT NULL, embedding_hash TEXT NOT NULL, UNIQUE (face_hash, embedding_hash));
"""

CALCULATOR = "dlib_face_recognition_resnet_model_v1"


def _exec_script(engine: sa.Engine, ddl: str) -> None:
    with engine.begin() as conn:
        for stmt in ddl.split(";"):
            if stmt.strip():
                conn.exec_driver_sql(stmt)


def build_compreface(url: str, services: list[tuple[str, str, list[str], np.ndarray]]) -> dict[str, list[str]]:
    """A CompreFace database: per service (name, api key, subjects per row, vectors) a
    recognition model, its subjects and one embedding (with a stored image) per row.
    Returns {api key: embedding ids in row order} (CompreFace's image ids)."""
    engine = sa.create_engine(url)
    _exec_script(engine, COMPREFACE_DDL)
    out: dict[str, list[str]] = {}
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO app VALUES (1, 'App', %s, %s)", (str(uuid.uuid4()), str(uuid.uuid4())))
        for m, (name, api_key, subjects, vectors) in enumerate(services, start=1):
            conn.exec_driver_sql("INSERT INTO model VALUES (%s, %s, %s, 1, %s, 'R')",
                                 (m, name, str(uuid.uuid4()), api_key))
            sid = {s: str(uuid.uuid4()) for s in dict.fromkeys(subjects)}
            conn.exec_driver_sql("INSERT INTO subject VALUES (%s, %s, %s)",
                                 [(i, api_key, s) for s, i in sid.items()])
            ids = [str(uuid.uuid4()) for _ in subjects]
            imgs = [str(uuid.uuid4()) for _ in subjects]
            # a stand-in for the uploaded photo (CompreFace keeps it when save_images_to_db)
            conn.exec_driver_sql("INSERT INTO img VALUES (%s, %s)", [(i, b"\xff\xd8 stored photo") for i in imgs])
            conn.exec_driver_sql(
                "INSERT INTO embedding VALUES (%s, %s, %s, %s, %s)",
                [(e, sid[s], [float(x) for x in v], CALCULATOR, i)
                 for e, s, v, i in zip(ids, subjects, vectors, imgs, strict=True)],
            )
            out[api_key] = ids
    engine.dispose()
    return out


def build_deepface(url: str, img_names: list[str], vectors: np.ndarray, *, pgvector_standin: bool = False) -> str:
    """deepface's `embeddings` table (or its pgvector table, stood in for) filled as
    `DeepFace.register` fills it, plus a row of its serialized index; returns the table."""
    engine = sa.create_engine(url)
    # deepface's pgvector client makes only its per-model table (its index lives in pgvector)
    _exec_script(engine, DEEPFACE_PGVECTOR_STANDIN if pgvector_standin else DEEPFACE_DDL)
    table = "embeddings_dlib_dlib_aligned_raw" if pgvector_standin else "embeddings"
    rows = []
    for name, v in zip(img_names, vectors, strict=True):
        emb = [float(x) for x in v]
        stored: object = "[" + ",".join(repr(x) for x in emb) + "]" if pgvector_standin else emb
        face = b"face crop of " + name.encode()  # a stand-in for the aligned face pixels
        rows.append((name, face, [1, 1, 3], "Dlib", "dlib", True, False, stored,
                     hashlib.sha256(face).hexdigest(), hashlib.sha256(json.dumps(emb).encode()).hexdigest()))
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"INSERT INTO {table} (img_name, face, face_shape, model_name, detector_backend, aligned, "
            "l2_normalized, embedding, face_hash, embedding_hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            rows,
        )
        if not pgvector_standin:
            conn.exec_driver_sql(
                "INSERT INTO embeddings_index (model_name, detector_backend, align, l2_normalized, index_data) "
                "VALUES ('Dlib', 'dlib', true, false, %s)", (np.asarray(vectors[:10], "<f4").tobytes(),)
            )
    engine.dispose()
    return table
