"""The audit trail and API-key scopes in the gallery, on a real SQLite file and a real
PostgreSQL database: an event commits with its change or not at all, and revision 0007
keeps every key made before it at full (admin) rights."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import inspect, text

from advplugin.gallery import Gallery, make_engine
from advplugin.gallery.apikeys import hash_api_key, scope_allows
from advplugin.gallery.audit import Actor
from advplugin.gallery.schema import upgrade
from advplugin.protectors import create_protector

BEFORE = "0006_blind_blocks"


class _Crash(Exception):
    pass


def test_event_and_change_commit_together_or_not_at_all(gallery: Gallery, key) -> None:
    protector = create_protector("xnn", key=key, dim=128)
    t = protector.protect(np.random.default_rng(0).normal(size=(2, 128)).astype(np.float32))
    meta = {"protection": protector.metadata, "extractor_name": "dlib", "extractor_version": "v1"}
    who = Actor.api_key(7)
    with pytest.raises(_Crash), gallery.transaction() as g:  # a crash after both writes
        g.add_templates(["Ann", "Ann"], t, **meta)
        g.record_audit(who, "enroll", collection="default", subject="Ann", template_count=2)
        raise _Crash
    assert gallery.count_templates() == 0 and gallery.audit_events() == []

    with gallery.transaction() as g:
        g.add_templates(["Ann", "Ann"], t, **meta)
        g.record_audit(who, "enroll", collection="default", subject="Ann", template_count=2)
    with pytest.raises(_Crash), gallery.transaction() as g:
        g.delete_subject("Ann")
        g.record_audit(who, "delete_subject", collection="default", subject="Ann", template_count=2)
        raise _Crash
    assert gallery.count_templates() == 2
    [e] = gallery.audit_events()
    assert (e.actor, e.api_key_id, e.action, e.subject, e.template_count) == ("api-key", 7, "enroll", "Ann", 2)
    assert e.created_at.tzinfo is not None


def test_scopes_are_ordered_and_unknown_ones_refused(gallery: Gallery) -> None:
    assert scope_allows("admin", "enrol") and scope_allows("enrol", "identify")
    assert not scope_allows("identify", "enrol") and not scope_allows("enrol", "admin")
    assert not scope_allows("root", "identify")
    with pytest.raises(ValueError, match="unknown API-key scope"):
        gallery.create_api_key("x", scope="root")
    assert gallery.list_api_keys() == [] and gallery.audit_events() == []


def test_0007_keeps_existing_keys_admin(gallery_url: str) -> None:
    engine = make_engine(gallery_url)
    try:
        upgrade(engine, BEFORE)
        with engine.begin() as conn:
            cid = conn.execute(text("INSERT INTO collections (name, created_at) VALUES ('c', :t) RETURNING id"),
                               {"t": datetime.now(UTC)}).scalar()
            conn.execute(
                text("INSERT INTO api_keys (collection_id, name, key_sha256, created_at) VALUES (:c, 'old', :h, :t)"),
                {"c": cid, "h": hash_api_key("old-key"), "t": datetime.now(UTC)},
            )
        assert "audit_events" not in inspect(engine).get_table_names()
        upgrade(engine)
        assert "audit_events" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    with Gallery.open(gallery_url) as g:
        [k] = g.active_api_keys()
        assert (k.collection, k.scope, k.key_sha256) == ("c", "admin", hash_api_key("old-key"))
        assert g.audit_events() == []
