"""The search service's Prometheus metrics (``GET /metrics``).

Two kinds: counters and a latency histogram updated by every request, and gauges read at
scrape time from the registry, the BM25 indexes and Redis (live collection per alias, index
age, migration progress, rate and ETA), so a scrape always shows the truth rather than what the
last request happened to see. Each app has its own ``CollectorRegistry``: several apps in one
process (tests) never share counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from reembed.errors import ReembedError
from reembed.lifecycle import FINAL_STATES
from reembed.status import alias_summary, migration_status

if TYPE_CHECKING:
    from search.searcher import Searcher

#: Latency buckets (seconds): keyword answers in milliseconds, semantic ones in tens of them.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class SearchMetrics:
    """What the request path updates."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.queries = Counter("reembed_search_queries", "Search queries answered, by requested mode, the mode "
                               "that answered and HTTP status.", ["mode", "answered", "status"], registry=registry)
        self.latency = Histogram("reembed_search_latency_seconds", "Time to answer one search request.",
                                 ["mode"], buckets=LATENCY_BUCKETS, registry=registry)
        self.refused = Counter("reembed_search_refused", "Search requests answered 503 because the process held "
                               "REEMBED_SEARCH_MAX_IN_FLIGHT already.", registry=registry)

    def observe(self, mode: str, answered: str, status: int, seconds: float) -> None:
        self.queries.labels(mode=mode, answered=answered, status=str(status)).inc()
        self.latency.labels(mode=mode).observe(seconds)


class StateCollector(Collector):
    """Gauges computed at scrape time from the searcher's registry, indexes and Redis."""

    def __init__(self, searcher: Callable[[], Searcher | None]) -> None:
        self.searcher = searcher

    def collect(self) -> Iterator[Metric]:
        live = GaugeMetricFamily("reembed_alias_live", "1 for the collection (and model) an alias serves.",
                                 labels=["alias", "collection", "model"])
        canary = GaugeMetricFamily("reembed_alias_canary_percent", "Share of queries sent to a canary collection.",
                                   labels=["alias", "collection"])
        index_age = GaugeMetricFamily("reembed_bm25_index_age_seconds", "Age of the BM25 index in memory.",
                                      labels=["collection"])
        index_docs = GaugeMetricFamily("reembed_bm25_index_documents", "Documents in the BM25 index in memory.",
                                       labels=["collection"])
        docs = GaugeMetricFamily("reembed_migration_documents", "A running migration's documents, by kind.",
                                 labels=["alias", "migration_id", "kind"])
        rate = GaugeMetricFamily("reembed_migration_rate_docs_per_second", "A running migration's average rate.",
                                 labels=["alias", "migration_id"])
        eta = GaugeMetricFamily("reembed_migration_eta_seconds", "A running migration's estimated time left.",
                                labels=["alias", "migration_id"])
        ready = GaugeMetricFamily("reembed_search_ready", "1 when this process has prepared the alias's collection "
                                  "in that role (live, canary, next, previous: index in memory, model warmed), else 0.",
                                  labels=["alias", "role"])
        up = GaugeMetricFamily("reembed_state_up", "1 when the registry and Redis could be read for this scrape.")
        searcher = self.searcher()
        ok = 1.0
        if searcher is not None:
            now = time.time()
            for collection, index in searcher.indexes.loaded().items():
                index_age.add_metric([collection], max(0.0, now - index.built_at))
                index_docs.add_metric([collection], len(index))
            for alias_name, roles in searcher.readiness.items():
                for role, prepared in roles.items():
                    if prepared is not None:
                        ready.add_metric([alias_name, role], 1.0 if prepared else 0.0)
            try:
                for alias, migration in _aliases(searcher):
                    live.add_metric([alias["alias"], alias["live_collection"], alias["model"]], 1)
                    if alias["canary"]:
                        canary.add_metric([alias["alias"], alias["canary"]["collection"]], alias["canary"]["percent"])
                    if migration is not None:
                        labels = [alias["alias"], migration["migration_id"]]
                        for kind in ("done", "failed", "skipped", "total"):
                            docs.add_metric([*labels, kind], migration[kind])
                        rate.add_metric(labels, migration["docs_per_s"])
                        if migration["eta_s"] is not None:
                            eta.add_metric(labels, migration["eta_s"])
            except ReembedError:  # Chroma or Redis down: say so, keep the rest of the scrape
                ok = 0.0
        up.add_metric([], ok)
        yield from (live, canary, index_age, index_docs, docs, rate, eta, ready, up)


def _aliases(searcher: Searcher) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Each alias's summary, and its running migration's progress (None when none runs)."""
    for alias in searcher.registry.aliases():
        latest = searcher.registry.latest_migration(alias.alias)
        running = None
        if latest is not None and latest.state not in FINAL_STATES and searcher.redis is not None:
            running = migration_status(searcher.redis, latest)
        yield alias_summary(searcher.registry, alias), running
