"""`IndexConfig`: the one typed configuration of a collection's search index.

A pydantic model (frozen) rather than a dataclass, so the service's `Settings` nests it as
`index` and pydantic-settings fills it from ADVPLUGIN_INDEX__<FIELD>; the same object reaches
`TemplateIndex` and the backend unchanged. Fields a backend does not use are ignored by it
(one flat model keeps every environment variable documented in one place).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator

from advplugin.gallery.backends.base import INDEX_BACKENDS

#: The index kinds of releases before backends were pluggable (ADVPLUGIN_INDEX_KIND=flat),
#: still accepted as `backend` and still what `/status` reports as the index kind.
SHORT_NAMES = {"flat": "faiss-flat", "ivf": "faiss-ivf", "hnsw": "faiss-hnsw"}


class IndexConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: A registered backend (`list_index_backends()`), or a short name of SHORT_NAMES.
    #: `kind=` is accepted as well, as the dataclass of earlier releases was built.
    backend: str = Field("faiss-flat", validation_alias=AliasChoices("backend", "kind"))
    ivf_nlist: int = Field(0, ge=0, description="IVF centroids; 0: about 4*sqrt(N) at build time")
    ivf_nprobe: int = Field(16, ge=1, description="IVF lists visited per search")
    hnsw_m: int = Field(32, ge=2, description="HNSW neighbours per node")
    hnsw_ef_search: int = Field(128, ge=1, description="HNSW candidate list per search")
    use_gpu: bool = Field(True, description="clone the index to a GPU when faiss-gpu has one")
    #: Searches re-read the SQL change log at most this often (seconds). Writes made through
    #: this process are applied at once (`catch_up` after each commit); the interval only
    #: bounds how stale a search may be for changes made by *other* processes (workers, a key
    #: rotation). 0: every search asks SQL first.
    sync_interval: float = Field(0.05, ge=0.0)

    # -- milvus (advplugin.gallery.backends.milvus_backend, docs/milvus.md) ------------------
    #: A Milvus server (`http://host:19530`: standalone or a cluster's proxy, shared by every
    #: replica) or a milvus-lite folder (a path ending in `.db`: embedded, one process only).
    #: Empty: the service uses `<data_dir>/milvus.db`; a bare IndexConfig (library use, tests)
    #: a temporary milvus-lite folder private to the process.
    milvus_uri: str = ""
    milvus_token: SecretStr | None = Field(None, description="`user:password` or an API key of the server")
    #: Collections are named `<prefix>_<fingerprint of database + collection>`: replicas of
    #: one deployment share one, two galleries never do.
    milvus_collection_prefix: str = Field("advplugin", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,100}$")
    #: FLAT is exact (what faiss-flat answers); HNSW / IVF_FLAT / ... trade recall for speed.
    milvus_index_type: str = Field("FLAT", pattern=r"^[A-Z_0-9]+$")
    milvus_index_params: dict[str, Any] = Field(default_factory=dict, description="e.g. {\"M\": 32}")
    milvus_search_params: dict[str, Any] = Field(default_factory=dict, description="e.g. {\"ef\": 128}")
    #: Strong: a search sees every write acknowledged before it, which the service needs
    #: (its own writes are searchable before it responds).
    milvus_consistency: Literal["Strong", "Bounded", "Session", "Eventually"] = "Strong"

    def __hash__(self) -> int:
        """Frozen configs stay hashable although the milvus params are dicts."""
        return hash(self.model_dump_json())

    @field_validator("backend", mode="before")
    @classmethod
    def _registered(cls, name: object) -> object:
        """Map a short name, then insist on a registered backend: a typo in the environment
        fails at start with the list of valid names, not at the first search."""
        if not isinstance(name, str):
            return name
        name = SHORT_NAMES.get(name, name)
        INDEX_BACKENDS.factory(name)  # raises ValueError listing what is registered
        return name

    @property
    def kind(self) -> str:
        """The short name (flat/ivf/hnsw) where the backend has one, else the backend name:
        what `/status` reports, unchanged from releases with only FAISS indexes."""
        return next((short for short, full in SHORT_NAMES.items() if full == self.backend), self.backend)
