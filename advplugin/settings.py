"""Typed settings of the gallery and the service, from environment variables (`ADVPLUGIN_*`).

With nothing set, the data lives in one data folder (`./.advplugin/data`, git-ignored: the SQLite
gallery and the FAISS snapshots) and the keys in a folder of their own OUTSIDE it and outside
its parent (`default_key_dir`: the user's config folder, 0700), so the folder an operator backs
up or copies carries no key; with the `dlib` extractor and the best protection scheme this
installation has.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from advplugin.gallery.backends import IndexConfig

#: Schemes the embedded default prefers, best first; the first one registered is used.
#: `xnn` leads on measurement (docs/evaluation, docs/schemes/advface.md): accuracy exactly
#: that of raw embeddings, 10x faster protection than `advface`, and keys that rotate on a
#: live gallery; `advface` resists only the non-adaptive attacker who holds the key, and
#: both fall to the adaptive attacker. Choose `advface` explicitly with ADVPLUGIN_SCHEME.
SCHEME_PREFERENCE = ("xnn", "advface")

#: The flat index variables of earlier releases (ADVPLUGIN_INDEX_KIND=hnsw, ...), still
#: honoured as ADVPLUGIN_<OLD> or as the keyword <old>: each sets `index.<new>`. Where a nested
#: ADVPLUGIN_INDEX__<FIELD> sets the same field, the nested one wins.
LEGACY_INDEX_FIELDS = {
    "index_kind": "backend",
    "ivf_nlist": "ivf_nlist",
    "ivf_nprobe": "ivf_nprobe",
    "hnsw_m": "hnsw_m",
    "hnsw_ef_search": "hnsw_ef_search",
    "use_gpu": "use_gpu",
    "index_sync_interval": "sync_interval",
}


class _LegacyIndexVariables(PydanticBaseSettingsSource):
    """Reads the variables of LEGACY_INDEX_FIELDS, which the environment source no longer
    looks for (they are not fields any more); `Settings` folds them into `index`."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the variables directly

    def __call__(self) -> dict[str, Any]:
        prefix = str(self.config.get("env_prefix", "")).lower()
        env = {name.lower(): value for name, value in os.environ.items()}
        return {old: env[prefix + old] for old in LEGACY_INDEX_FIELDS if prefix + old in env}


class AnswerSettings(BaseModel):
    """What an answer may reveal (docs/service.md, "What an answer reveals"), one field each
    as ADVPLUGIN_ANSWERS__<FIELD>. Keys without the exact-scores capability are answered with
    decisions: only subjects whose score passes the operating point's calibrated threshold,
    at most `max_predictions` per face, each with a band value, never a raw score; and each
    key has a budget per rolling window (`advplugin.gallery.budgets`)."""

    #: The default operating point: the false match rate whose calibrated threshold decides a
    #: match (per scheme and extractor: `advplugin.protectors.calibration_for`). A collection
    #: may choose its own (`advplugin db collection set --fmr`). 1e-2 keeps identification
    #: within 0.1 pp of answering the top subject always (dlib on LFW); 1e-3 costs ~1.3 pp and
    #: names fewer strangers as someone (docs/service.md, "What an answer reveals").
    decision_fmr: float = Field(1e-2, gt=0.0, lt=1.0)
    #: A decision threshold in the scheme's score units, for a scheme and extractor that ship
    #: no calibration (then required); overrides the calibrated one where given.
    decision_threshold: float | None = None
    #: Matches at or above this FMR's threshold are strong: they earn budget credit.
    strong_fmr: float = Field(1e-5, gt=0.0, lt=1.0)
    #: Subjects named per face, at most, whatever `prediction_count` asks.
    max_predictions: int = Field(1, ge=1, le=100)
    budget_window_hours: int = Field(24, ge=1, le=24 * 366)
    #: Faces that matched no one, per key and window.
    budget_unmatched: int = Field(2000, ge=0)
    #: Weak matches naming a subject new to the key, per key and window ...
    budget_lookalikes: int = Field(10, ge=0)
    #: ... plus this many per distinct subject strongly matched in the window.
    budget_credit_per_strong: float = Field(2.0, ge=0.0)


def best_available_scheme(preference: tuple[str, ...] = SCHEME_PREFERENCE) -> str:
    from advplugin.protectors import list_schemes

    available = set(list_schemes())
    for name in preference:
        if name in available:
            return name
    raise ValueError(f"none of the preferred schemes {preference} is registered")


def default_key_dir(data_dir: Path) -> Path:
    """The default key folder of the gallery whose data folder is `data_dir`:
    `$XDG_CONFIG_HOME/advplugin/keys/<name>-<hash>` (`~/.config` when the variable is unset),
    one folder per data folder (named after its path, plus a hash of it, so two galleries
    on one machine never share a key).

    Why there: the keys must not travel with the data. A backup or copy of the data folder,
    or of the folder around it (`.advplugin/`), that also held the erasure key store opened
    a deleted subject again, and one that held the master key opened everything. The
    config folder is per user and outside any project tree. A data folder moved elsewhere
    therefore finds no key, and the service refuses to start (it never makes a new key
    beside an existing gallery): set ADVPLUGIN_KEY_DIR to the old key folder."""
    where = data_dir.absolute()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(where.parts[-3:])).strip("_.-")[:60] or "root"
    digest = hashlib.sha256(str(where).encode()).hexdigest()[:12]
    return base / "advplugin" / "keys" / f"{name}-{digest}"


def _legacy(*paths: Path) -> Path | None:
    """The first of the defaults of earlier releases that exists (an install keeps its keys)."""
    return next((p for p in paths if p.exists()), None)


class Settings(BaseSettings):
    """Every field can be set as ADVPLUGIN_<FIELD> (e.g. ADVPLUGIN_DATABASE_URL)."""

    model_config = SettingsConfigDict(env_prefix="ADVPLUGIN_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Path(".advplugin/data")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in data_dir")
    #: Where the keys live when their own settings are unset: the scheme key (`key`), the
    #: master key (`master.key`) and the erasure key store (`erasure-keys.db`). Default:
    #: `default_key_dir(data_dir)`, in the user's config folder, never inside the data
    #: folder's parent (docs/sealed-storage.md, "Where the keys live"). In a container: a
    #: mounted secret folder, or the keys themselves from a secret store or KMS.
    key_dir: Path | None = Field(None, description="default: $XDG_CONFIG_HOME/advplugin/keys/<data folder>")
    key_file: Path | None = Field(None, description="default: <key_dir>/key (created 0600 for a new gallery)")
    #: During a key rotation (images mode): the key being retired. `key_file` is then the new
    #: key; templates still under this one are matched with it (docs/migration.md).
    previous_key_file: Path | None = Field(None, description="the old key while a key rotation runs")
    index_dir: Path | None = Field(None, description="FAISS snapshots; default: data_dir/index")
    #: Sealed storage (docs/sealed-storage.md): the master key that wraps the gallery's data
    #: key. Default: `<key_dir>/master.key`, created 0600 when a new gallery is sealed (an
    #: install of an earlier release keeps its `<data_dir>/../master.key`, with a warning).
    #: Or give the key itself, base64 of 32 bytes, as ADVPLUGIN_MASTER_KEY (then no file is
    #: read or made).
    master_key_file: Path | None = Field(None, description="default: <key_dir>/master.key")
    master_key: SecretStr | None = Field(None, description="base64 master key (instead of a file)")
    #: Erasure keys (docs/sealed-storage.md, "Erasure"): one per subject, held OUTSIDE the
    #: database, shredded when the subject is deleted, so copies of the database made before
    #: (dumps, backups) lose the subject too. A file path (SQLite, made 0600) or a SQLAlchemy
    #: URL (replicas share one: a small database of its own, not backed up with the gallery).
    erasure_key_store: str | None = Field(None, description="default: <master key folder>/erasure-keys.db")
    #: Folders the operator backs up (JSON list): start-up and `advplugin db status` warn
    #: when a key or the erasure key store is inside one of them.
    backup_paths: list[Path] = Field(default_factory=list, description="folders that are backed up")

    #: "images": the service holds the key, extracts and protects uploads. "templates": it
    #: holds no key and accepts only templates protected on the client side. "blind": it holds
    #: no key and sees only CKKS ciphertexts of client-protected templates (/blind routes,
    #: docs/blind.md); the template settings below describe what the clients protect with.
    mode: Literal["images", "templates", "blind"] = "images"
    scheme: str | None = Field(None, description="default: best of SCHEME_PREFERENCE available")
    #: Options of the scheme, as `advplugin protect --option` takes them, as JSON
    #: (ADVPLUGIN_SCHEME_OPTIONS='{"release": 1}'): e.g. to keep serving a gallery made by an
    #: earlier release of a trained scheme (its rows' config digest says which).
    scheme_options: dict[str, Any] = Field(default_factory=dict, description="scheme options (JSON)")
    allow_unprotected: bool = Field(False, description="permit the `none` scheme (baseline only)")
    extractor: str = "dlib"
    # Template mode: what client templates must carry (the service has no key to derive it).
    template_key_id: str | None = None
    template_dim: int = 128
    template_extractor: str = "dlib"

    #: The search index of each collection: backend and its parameters, one field each as
    #: ADVPLUGIN_INDEX__<FIELD> (ADVPLUGIN_INDEX__BACKEND=faiss-hnsw); the flat variables of
    #: earlier releases still work (LEGACY_INDEX_FIELDS). `index.sync_interval` (0.05 s) is the
    #: max staleness of searches w.r.t. writes made by *other* processes (workers, a key
    #: rotation); this process's own writes are searchable before their response.
    index: IndexConfig = IndexConfig()
    #: OpenMP threads per FAISS search. 1: requests already run in parallel threads, and
    #: OpenMP spin-waiting on busy cores made single-query searches 30x slower in measurements.
    search_threads: int = 1
    snapshot_every: int = Field(1000, description="write the FAISS snapshot after this many changes")

    #: Index candidates re-scored by the scheme's own scorer per probe (and per key during a
    #: key rotation); at least 5 x the subjects asked for.
    match_candidates: int = Field(50, ge=1, le=10_000)

    #: Blind mode: accept plaintext probes against the encrypted gallery (off: the probe is
    #: then visible to the server; docs/blind.md says when the threat model allows it).
    blind_plain_probes: bool = False
    #: Blind mode: threads scoring blocks of one probe in parallel.
    blind_threads: int = Field(1, ge=1)

    max_upload_bytes: int = 10 * 1024 * 1024
    #: Seconds from a request's headers to the end of its body; a body still incomplete then
    #: (never sent, or trickled) is answered 408 and the connection closed, instead of holding
    #: a connection and its request open without limit.
    body_timeout_s: float = Field(30.0, gt=0)
    max_pixels: int = 25_000_000
    max_faces: int = 20
    max_templates_per_request: int = 1000
    #: Image requests decoded or extracted at once per process (running or waiting for the
    #: extractor); more are refused with 429 and Retry-After instead of queueing.
    max_concurrent_extractions: int = Field(4, ge=1)
    #: Worker processes that decode, extract and protect images (images mode), each with its
    #: own extractor: dlib holds the GIL, so only processes use more than one core. 0: in
    #: the serving process, one image at a time.
    extraction_workers: int = Field(0, ge=0, le=64)
    store_images: bool = Field(False, description="keep uploaded images in SQL (off: hash only)")

    #: `advplugin serve`'s log lines: "text", or "json" (one object per line, for a log
    #: pipeline). Either way the access log names route templates, never paths or queries.
    log_format: Literal["text", "json"] = "text"
    host: str = "127.0.0.1"
    port: int = 8000
    #: Bootstrap key for a fresh gallery (stored hashed); if unset and the gallery has no API
    #: key, the service creates one and writes it to data_dir/api-key (0600).
    api_key: SecretStr | None = None
    #: Grant the bootstrap key exact scores when it is created (audited; for evaluation and
    #: analytics set-ups: such a key can read enrolled people back out of the scores).
    api_key_exact_scores: bool = False
    #: What answers may reveal, and the budgets (`AnswerSettings`).
    answers: AnswerSettings = AnswerSettings()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'gallery.db').resolve()}"

    @property
    def resolved_key_dir(self) -> Path:
        return self.key_dir or default_key_dir(self.data_dir)

    @property
    def resolved_key_file(self) -> Path:
        """The scheme key: in the key folder, so a copy of the data folder (or of its
        parent) does not carry the key that inverts its templates. A key left by an earlier
        release (`<data_dir>/key`, then `<data_dir>/../key`) is still used."""
        if self.key_file is not None:
            return self.key_file
        return _legacy(self.data_dir / "key", self.data_dir.absolute().parent / "key") or (
            self.resolved_key_dir / "key"
        )

    @property
    def resolved_master_key_file(self) -> Path:
        """The master key file (`master_key_file` docs); the erasure store's default folder."""
        if self.master_key_file is not None:
            return self.master_key_file
        return _legacy(self.data_dir.absolute().parent / "master.key") or self.resolved_key_dir / "master.key"

    @property
    def resolved_erasure_key_store(self) -> str:
        """`erasure_key_store`, else `erasure-keys.db` beside the master key file (for an
        install of an earlier release: beside its data folder, where that release made it)."""
        if self.erasure_key_store:
            return self.erasure_key_store
        old = _legacy(self.data_dir.absolute().parent / "erasure-keys.db") if self.master_key_file is None else None
        return str(old or self.resolved_master_key_file.absolute().parent / "erasure-keys.db")

    @property
    def resolved_index_dir(self) -> Path:
        return self.index_dir or self.data_dir / "index"

    @property
    def resolved_scheme(self) -> str:
        return self.scheme or best_available_scheme()

    @model_validator(mode="before")
    @classmethod
    def _fold_legacy_index_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not any(old in data for old in LEGACY_INDEX_FIELDS):
            return data
        data = dict(data)
        legacy = {new: data.pop(old) for old, new in LEGACY_INDEX_FIELDS.items() if old in data}
        nested = data.get("index", {})
        if isinstance(nested, IndexConfig):
            nested = nested.model_dump(exclude_unset=True)
        if isinstance(nested, dict):
            data["index"] = {**legacy, **nested}
        return data

    @model_validator(mode="after")
    def _milvus_lite_in_data_dir(self) -> Settings:
        """The milvus backend without a URI keeps its milvus-lite folder in the data folder
        (beside the SQLite gallery), not in a temporary one that a restart would lose."""
        if self.index.backend == "milvus" and not self.index.milvus_uri:
            uri = str((self.data_dir / "milvus.db").absolute())
            self.index = self.index.model_copy(update={"milvus_uri": uri})
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        legacy = _LegacyIndexVariables(settings_cls)
        return init_settings, env_settings, legacy, dotenv_settings, file_secret_settings
