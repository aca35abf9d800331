"""API-key lookups on the request path (`advplugin.service.auth.ApiKeyAuth`): answered from the
hashes in memory without SQL, which is what lets the dependency run on the event loop; the
store is re-read only when the answer could be stale (a revocation, a key made since)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from advplugin.gallery import Database
from advplugin.gallery.apikeys import ApiKeyStore
from advplugin.service import auth as auth_module
from advplugin.service.auth import STALE, ApiKeyAuth


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ApiKeyStore]:
    """The API-key part alone, over its own database handle: what authentication depends on."""
    db = Database.open(f"sqlite:///{tmp_path / 'g.db'}", upgrade=True)
    yield ApiKeyStore(db)
    db.close()


class CountingStore:
    """The real store, counting its reads."""

    def __init__(self, store: ApiKeyStore) -> None:
        self.store, self.reads = store, 0

    def active_api_keys(self):  # type: ignore[no-untyped-def]
        self.reads += 1
        return self.store.active_api_keys()


def test_known_keys_are_answered_without_sql_and_stale_answers_are_flagged(
    store: ApiKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(auth_module.time, "monotonic", lambda: clock[0])
    ops = store.create_api_key("ops", collection="c1", scope="enrol")
    counting = CountingStore(store)
    auth = ApiKeyAuth(counting)  # type: ignore[arg-type]

    assert auth.cached_caller(ops) is STALE  # never loaded
    caller = auth.caller(ops)
    assert caller is not None and (caller.collection, caller.scope) == ("c1", "enrol")
    assert counting.reads == 1
    for _ in range(5):  # the request path: memory only
        assert auth.cached_caller(ops) == caller
    assert auth.cached_caller(None) is None and auth.cached_caller("x" * 10_000) is None
    assert counting.reads == 1

    # A key made since the last load: unknown until the miss window has passed, then STALE,
    # and the re-read finds it.
    new = store.create_api_key("new", collection="c2", scope="admin")
    assert auth.cached_caller(new) is None
    clock[0] += auth_module._RELOAD_MISS_AFTER + 0.1
    assert auth.cached_caller(new) is STALE and auth.cached_caller(ops) == caller
    found = auth.caller(new)
    assert found is not None and found.collection == "c2" and counting.reads == 2

    # A revocation is seen once the answers are older than _RELOAD_EVERY.
    store.revoke_api_keys("ops", collection="c1")
    assert auth.cached_caller(ops) == caller  # within the promised staleness
    clock[0] += auth_module._RELOAD_EVERY + 0.1
    assert auth.cached_caller(ops) is STALE
    assert auth.caller(ops) is None and counting.reads == 3
    assert auth.cached_caller(ops) is None  # and from memory afterwards
