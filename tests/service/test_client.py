"""The typed client package (`advplugin.client`), sync and async, against a live service:
every template-mode operation, names that need encoding, and errors as `ApiError`."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from advplugin.client import AdvpluginError, ApiError, AsyncClient, Client
from advplugin.protectors import create_protector
from tests.service.conftest import migrated_database
from tests.service.helpers import protection_of, template_env


def test_sync_and_async_clients(key, tmp_path, make_server) -> None:
    protector = create_protector("xnn", key=key, dim=128)
    prot = protection_of(protector)
    server = make_server(template_env(migrated_database("sqlite", tmp_path, None), tmp_path, key))  # type: ignore[arg-type]
    t = protector.protect(np.random.default_rng(0).normal(size=(3, 128)).astype(np.float32))
    names = ["Ann", "a/b?c#d%e", "Ann"]
    with Client(server.url, server.api_key) as c:
        assert c.health() == {"status": "ok"} and c.status()["key_id"] == key.key_id
        out = c.enroll_templates(names, t, prot)  # a numpy array is accepted as it is
        assert [i["subject"] for i in out["templates"]] == names
        res = c.identify_templates(t[:2], prot, prediction_count=2)
        assert [r["subjects"][0]["subject"] for r in res["result"]] == ["Ann", "a/b?c#d%e"]
        assert c.subject("a/b?c#d%e")["template_count"] == 1
        assert c.subjects(size=10)["total"] == 2
        assert c.delete_subject("a/b?c#d%e") == {"subject": "a/b?c#d%e", "deleted_templates": 1}
        with pytest.raises(ApiError) as err:
            c.subject("a/b?c#d%e")
        assert (err.value.status, err.value.code) == (404, "unknown_subject")
        with pytest.raises(ApiError) as err:
            c.identify_templates(t[:1], prot | {"key_id": "0" * 16})
        assert (err.value.status, err.value.code) == (422, "wrong_key")
    with pytest.raises(ApiError) as err:
        Client(server.url, "not-a-key").status()
    assert err.value.status == 401
    assert AdvpluginError is ApiError  # the earlier name of the client's error, kept (public API)

    async def run() -> None:
        async with AsyncClient(server.url, server.api_key) as c:
            res = await c.identify_templates(t[:1].tolist(), prot)  # plain lists too
            assert res["result"][0]["subjects"][0]["subject"] == "Ann"
            pages = await asyncio.gather(*(c.subjects(page=p, size=1) for p in range(2)))
            assert [p["subjects"][0]["subject"] for p in pages if p["subjects"]] == ["Ann"]
            assert (await c.delete_subject("Ann"))["deleted_templates"] == 2
            with pytest.raises(ApiError, match="unknown_subject"):
                await c.delete_subject("Ann")

    asyncio.run(run())
