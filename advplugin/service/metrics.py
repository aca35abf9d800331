"""Prometheus metrics of one service process, served at `GET /metrics` (text format).

Requests: counts by method, route *template* (`/subjects/{name}`, never the path itself, so
neither a subject name nor a query string can become a label) and status, and latencies by
method and route. Gallery, read at each scrape from what the service already holds: per
collection *id* (names are tenants' and stay out), templates, subjects, index size, index lag
(change-log entries committed in SQL that the index has not applied yet) and, during a key
rotation, the templates still under the previous key. Never a vector, a key or a name.

A registry per app, not prometheus_client's global one: two apps in one process (tests) do
not collide, and nothing else that happens to register globally leaks into /metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from advplugin.service.logs import route_template

if TYPE_CHECKING:
    from advplugin.service.state import ServiceState

class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "advplugin_http_requests", "HTTP requests answered", ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "advplugin_http_request_duration_seconds", "Time to answer a request", ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.gallery = _GalleryCollector()
        self.registry.register(self.gallery)

    def response(self, state: ServiceState) -> Response:
        self.gallery.state = state
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _GalleryCollector(Collector):
    """Gallery figures computed at scrape time (a few indexed counts per collection)."""

    def __init__(self) -> None:
        self.state: ServiceState | None = None

    def describe(self) -> list[Metric]:
        return []  # computed at scrape: nothing to describe before a state exists

    def collect(self) -> Iterator[Metric]:
        state = self.state
        if state is None:
            return
        labels = ["collection_id"]
        families = {
            "templates": GaugeMetricFamily("advplugin_gallery_templates", "Templates stored (SQL)", labels=labels),
            "subjects": GaugeMetricFamily("advplugin_gallery_subjects", "Subjects stored (SQL)", labels=labels),
            "index": GaugeMetricFamily("advplugin_index_size", "Vectors in the search index", labels=labels),
            "lag": GaugeMetricFamily(
                "advplugin_index_lag_changes", "Changes committed in SQL not yet applied to the index", labels=labels
            ),
            "previous": GaugeMetricFamily(
                "advplugin_rotation_previous_key_templates",
                "Templates still under the key being retired (0 outside a key rotation)", labels=labels,
            ),
        }
        gallery, protection = state.gallery, state.protection
        previous = protection.previous
        for name in gallery.collections():
            cid = str(gallery.collection_id(name, create=False))
            index = state.collections.index(name)
            families["templates"].add_metric([cid], gallery.count_templates(collection=name))
            families["subjects"].add_metric([cid], gallery.count_subjects(collection=name))
            families["index"].add_metric([cid], index.size)
            families["lag"].add_metric([cid], max(0, gallery.last_change_seq(collection=name) - index.last_seq))
            old = 0
            if previous is not None:
                old = gallery.count_templates(collection=name, key_id=previous.metadata.key_id)
            families["previous"].add_metric([cid], old)
        yield from families.values()
        yield from _answer_families(state)


def _answer_families(state: ServiceState) -> Iterator[Metric]:
    """What this process answered under the answer policy (`advplugin.service.answers`), per
    collection id and outcome. `refused` counts requests refused by a key's budget: alert on
    `increase(advplugin_answer_budget_refusals_total[10m]) > 0`."""
    answered = CounterMetricFamily(
        "advplugin_answers", "Faces answered by outcome: strong or weak match, or unmatched",
        labels=["collection_id", "outcome"],
    )
    refused = CounterMetricFamily(
        "advplugin_answer_budget_refusals", "Requests refused because the key's answer budget was used up",
        labels=["collection_id"],
    )
    gallery = state.gallery
    for (outcome, collection), n in state.answers.counted():
        cid = str(gallery.collection_id(collection, create=False))
        if outcome == "refused":
            refused.add_metric([cid], n)
        else:
            answered.add_metric([cid, outcome], n)
    yield answered
    yield refused


class RequestMetrics:
    """Counts and times every HTTP request by its route template (pure ASGI middleware)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            template = route_template(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)


async def metrics_endpoint(request: Request) -> Response:
    return request.app.state.metrics.response(request.app.state.service)
