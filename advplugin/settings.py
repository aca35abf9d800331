"""Typed settings of the gallery and the service, from environment variables (`ADVPLUGIN_*`).

With nothing set, everything lives in one data folder (`./.advplugin/data`, git-ignored): the SQLite
gallery, the FAISS snapshots and the key file (created 0600 on first start), with the
`dlib` extractor and the best protection scheme this installation has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Schemes the embedded default prefers, best first; the first one registered is used.
#: `xnn` leads on measurement (docs/evaluation, docs/schemes/advface.md): accuracy exactly
#: that of raw embeddings, 10x faster protection than `advface`, and keys that rotate on a
#: live gallery; `advface` resists only the non-adaptive attacker who holds the key, and
#: both fall to the adaptive attacker. Choose `advface` explicitly with ADVPLUGIN_SCHEME.
SCHEME_PREFERENCE = ("xnn", "advface")

IndexKind = Literal["flat", "ivf", "hnsw"]


def best_available_scheme(preference: tuple[str, ...] = SCHEME_PREFERENCE) -> str:
    from advplugin.protectors import list_schemes

    available = set(list_schemes())
    for name in preference:
        if name in available:
            return name
    raise ValueError(f"none of the preferred schemes {preference} is registered")


class Settings(BaseSettings):
    """Every field can be set as ADVPLUGIN_<FIELD> (e.g. ADVPLUGIN_DATABASE_URL)."""

    model_config = SettingsConfigDict(env_prefix="ADVPLUGIN_", extra="ignore")

    data_dir: Path = Path(".advplugin/data")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in data_dir")
    key_file: Path | None = Field(None, description="default: data_dir/key (created 0600 if missing)")
    #: During a key rotation (images mode): the key being retired. `key_file` is then the new
    #: key; templates still under this one are matched with it (docs/migration.md).
    previous_key_file: Path | None = Field(None, description="the old key while a key rotation runs")
    index_dir: Path | None = Field(None, description="FAISS snapshots; default: data_dir/index")

    #: "images": the service holds the key, extracts and protects uploads. "templates": it
    #: holds no key and accepts only templates protected on the client side.
    mode: Literal["images", "templates"] = "images"
    scheme: str | None = Field(None, description="default: best of SCHEME_PREFERENCE available")
    allow_unprotected: bool = Field(False, description="permit the `none` scheme (baseline only)")
    extractor: str = "dlib"
    # Template mode: what client templates must carry (the service has no key to derive it).
    template_key_id: str | None = None
    template_dim: int = 128
    template_extractor: str = "dlib"

    index_kind: IndexKind = "flat"
    ivf_nlist: int = 0  # 0: about 4*sqrt(N) at build time
    ivf_nprobe: int = 16
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    use_gpu: bool = Field(True, description="clone the index to a GPU when faiss-gpu has one")
    #: OpenMP threads per FAISS search. 1: requests already run in parallel threads, and
    #: OpenMP spin-waiting on busy cores made single-query searches 30x slower in measurements.
    search_threads: int = 1
    #: Max staleness (s) of searches w.r.t. writes made by *other* processes (workers, a
    #: key rotation); this process's own writes are searchable before their response.
    index_sync_interval: float = 0.05
    snapshot_every: int = Field(1000, description="write the FAISS snapshot after this many changes")

    #: Index candidates re-scored by the scheme's own scorer per probe (and per key during a
    #: key rotation); at least 5 x the subjects asked for.
    match_candidates: int = Field(50, ge=1, le=10_000)

    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 25_000_000
    max_faces: int = 20
    max_templates_per_request: int = 1000
    store_images: bool = Field(False, description="keep uploaded images in SQL (off: hash only)")

    host: str = "127.0.0.1"
    port: int = 8000
    #: Bootstrap key for a fresh gallery (stored hashed); if unset and the gallery has no API
    #: key, the service creates one and writes it to data_dir/api-key (0600).
    api_key: SecretStr | None = None

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'gallery.db').resolve()}"

    @property
    def resolved_key_file(self) -> Path:
        return self.key_file or self.data_dir / "key"

    @property
    def resolved_index_dir(self) -> Path:
        return self.index_dir or self.data_dir / "index"

    @property
    def resolved_scheme(self) -> str:
        return self.scheme or best_available_scheme()
