"""`GET /metrics`, scraped over real HTTP: request counts and latencies by route template,
gallery and index sizes and index lag by collection id; no subject name, query string, key
or vector in it."""

from __future__ import annotations

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from advplugin.protectors import create_protector
from tests.service.conftest import migrated_database
from tests.service.helpers import protection_of, template_env


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def test_metrics_are_scraped_without_names_or_vectors(key, tmp_path, make_server) -> None:
    protector = create_protector("xnn", key=key, dim=128)
    prot = protection_of(protector)
    url = migrated_database("sqlite", tmp_path, None)  # type: ignore[arg-type]
    server = make_server(template_env(url, tmp_path, key))
    t = protector.protect(np.random.default_rng(0).normal(size=(3, 128)).astype(np.float32))
    names = ["Secret Name One", "Secret Name Two", "Secret Name Two"]
    with server.client() as c:
        r = c.post("/enroll/templates", json={"protection": prot, "items": [
            {"subject": n, "template": v.tolist()} for n, v in zip(names, t, strict=True)]})
        assert r.status_code == 201
        assert c.get("/subjects/Secret Name One").status_code == 200
        assert c.get("/subjects/Nobody Here", params={"token": "query-secret"}).status_code == 404
        assert c.get("/no/such/path-secret").status_code == 404
        assert c.get("/metrics").status_code == 200
        text = c.get("/metrics").text
    samples = _samples(text)
    assert samples[("advplugin_http_requests_total", (("method", "GET"), ("route", "/metrics"), ("status", "200")))] == 1
    count = "advplugin_http_requests_total"
    assert samples[(count, (("method", "POST"), ("route", "/enroll/templates"), ("status", "201")))] == 1
    assert samples[(count, (("method", "GET"), ("route", "/subjects/{name}"), ("status", "200")))] == 1
    assert samples[(count, (("method", "GET"), ("route", "/subjects/{name}"), ("status", "404")))] == 1
    assert samples[(count, (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    hist = "advplugin_http_request_duration_seconds_count"
    assert samples[(hist, (("method", "POST"), ("route", "/enroll/templates")))] == 1
    by_collection = {name: v for (name, labels), v in samples.items() if labels and labels[0][0] == "collection_id"}
    assert by_collection["advplugin_gallery_templates"] == 3 == by_collection["advplugin_index_size"]
    assert by_collection["advplugin_gallery_subjects"] == 2
    assert by_collection["advplugin_index_lag_changes"] == 0
    assert by_collection["advplugin_rotation_previous_key_templates"] == 0
    for secret in ("Secret", "Nobody", "query-secret", "path-secret", server.api_key, key.key_id):
        assert secret not in text


def test_json_logs_carry_request_ids_and_no_paths_or_queries(key, tmp_path, make_server) -> None:
    """uvicorn's access log wrote raw paths and query strings: a person's name
    (/subjects/Ada Lovelace) or whatever a client put in a query landed in the log."""
    import json

    protector = create_protector("xnn", key=key, dim=128)
    url = migrated_database("sqlite", tmp_path, None)  # type: ignore[arg-type]
    server = make_server(template_env(url, tmp_path, key) | {"ADVPLUGIN_LOG_FORMAT": "json"})
    t = protector.protect(np.random.default_rng(0).normal(size=(1, 128)).astype(np.float32))
    with server.client() as c:
        r = c.post("/enroll/templates", json={"protection": protection_of(protector), "items": [
            {"subject": "Ada Lovelace", "template": t[0].tolist()}]})
        ids = {r.headers["x-request-id"]: (201, "/enroll/templates")}
        r = c.get("/subjects/Ada Lovelace", params={"token": "query-secret"})
        ids[r.headers["x-request-id"]] = (200, "/subjects/{name}")
        r = c.delete("/subjects/Nobody Else")
        ids[r.headers["x-request-id"]] = (404, "/subjects/{name}")
    server.stop()
    log = server.log()
    for secret in ("Ada", "Lovelace", "Nobody", "query-secret", "token="):
        assert secret not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if line["logger"] == "advplugin.access"}
    for request_id, (status, route) in ids.items():
        line = access[request_id]
        assert (line["status"], line["route"]) == (status, route) and line["duration_ms"] >= 0
        assert line["level"] == "info" and line["time"].endswith("+00:00")
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's too, as JSON
