"""The HTTP search with the app's real start-up, against real Redis, Chroma, workers and models.

Every answer must say what served it, and that must be the model recorded on the collection it
names: before, during and after a migration, and after a rollback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from producer import ControlPlane
from reembed.models import load_model, resolve_model
from reembed.registry import MigrationState
from cli.services import ChromaServer, Workers, free_port
from reembed import readiness
from reembed.bm25 import Bm25Index
from reembed.fusion import DEFAULT_FUSION
from reembed.settings import Settings
from reembed.store import Store
from search import Searcher
from search.api import create_app
from search.indexes import IndexManager
from tests.conftest import M2V_MINILM, M2V_MPNET, need
from tests.integration.conftest import scifact_subset

pytestmark = pytest.mark.integration

# A SciFact claim whose judged abstract (4983) is the first document of the corpus.
QUERY = "Microstructural development of human newborn cerebral white matter"


def ingest(control: ControlPlane, tmp_path: Path, n: int = 200) -> str:
    corpus = scifact_subset(tmp_path / "corpus.jsonl", n)
    record = control.ingest("sci", corpus, "all-MiniLM-L6-v2", batch_size=50)
    assert control.wait(record.id, timeout=600).state == MigrationState.LIVE
    return control.registry.get_alias("sci").live_collection


def test_http_search_modes_limits_and_errors(
        tmp_path: Path, settings: Settings, chroma: ChromaServer, control: ControlPlane,
        start_workers: Callable[..., Workers]) -> None:
    start_workers(2)
    live = ingest(control, tmp_path)
    record = control.registry.get_collection(live)
    with TestClient(create_app(settings)) as client:
        # Start-up built and loaded the index before the first request.
        assert client.get("/healthz").json()["indexes"] == {live: 200}
        answers = {}
        for mode in ("keyword", "semantic", "hybrid"):
            response = client.get("/search", params={"alias": "sci", "q": QUERY, "k": 5, "mode": mode})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["mode"] == mode and body["degraded"] is None
            assert body["served_by"] | {"bm25_index": None} == {
                "collection": live, "model": "all-MiniLM-L6-v2", "fingerprint": record.fingerprint,
                "canary": False, "bm25_index": None, "standing_in_for": None, "fused_with": None,
                "fusion": DEFAULT_FUSION.describe() if mode == "hybrid" else None}
            assert len(body["results"]) == 5 and body["results"][0]["id"] == "4983"
            assert body["results"][0]["metadata"] == {"source": "scifact", "position": 0}
            assert body["results"][0]["document"].startswith("Microstructural development")
            answers[mode] = body["results"]
        assert all(h["ranks"]["semantic"] is None for h in answers["keyword"])
        assert all(h["ranks"]["bm25"] is None for h in answers["semantic"])
        # A fusion asked for by the request: equal-weight RRF, or the semantic ranking alone.
        rrf = client.get("/search", params={"alias": "sci", "q": QUERY, "fusion": "rrf:0.5:60"}).json()
        top = rrf["results"][0]
        assert rrf["served_by"]["fusion"] == "rrf semantic_weight=0.5 k=60"
        assert top["score"] == pytest.approx(0.5 / (60 + top["ranks"]["bm25"]) + 0.5 / (60 + top["ranks"]["semantic"]))
        alone = client.post("/search", json={"alias": "sci", "q": QUERY, "k": 5, "fusion": "convex:1"}).json()
        assert [h["id"] for h in alone["results"]] == [h["id"] for h in answers["semantic"]]
        bad = client.get("/search", params={"alias": "sci", "q": QUERY, "fusion": "linear"})
        assert bad.status_code == 422 and "convex[:WEIGHT] or rrf" in bad.json()["detail"], bad.text
        # POST takes a list of queries
        batch = client.post("/search", json={"alias": "sci", "q": [QUERY, "vitamin D deficiency"], "k": 3})
        assert batch.status_code == 200 and len(batch.json()["responses"]) == 2
        # Limits and errors
        assert client.get("/search", params={"alias": "sci", "q": ""}).status_code == 422
        assert client.get("/search", params={"alias": "sci", "q": "x", "k": 0}).status_code == 422
        assert client.get("/search", params={"alias": "sci", "q": "x", "k": 1001}).status_code == 422
        assert client.get("/search", params={"alias": "sci", "q": "x" * 10_001}).status_code == 422
        assert client.get("/search", params={"alias": "sci", "q": "x", "mode": "fuzzy"}).status_code == 422
        assert client.post("/search", json={"alias": "sci", "q": "   "}).status_code == 422
        # A field the API does not know (LangChain's name for a filter, which it would not apply)
        # is refused, never ignored.
        extra = client.post("/search", json={"alias": "sci", "q": "x", "filter": {"bucket": 1}})
        assert extra.status_code == 422 and extra.json()["detail"][0]["loc"] == ["body", "filter"], extra.text
        extra = client.get("/search", params={"alias": "sci", "q": "x", "filter": "{}"})
        assert extra.status_code == 422 and extra.json()["detail"][0]["loc"] == ["query", "filter"], extra.text
        missing = client.get("/search", params={"alias": "nope", "q": "x"})
        assert missing.status_code == 404 and "nope" in missing.json()["detail"]
        # /aliases: the live collection, model, count
        aliases = client.get("/aliases").json()["aliases"]
        assert [(a["alias"], a["live_collection"], a["model"], a["documents"]) for a in aliases] == \
            [("sci", live, "all-MiniLM-L6-v2", 200)]
        # Chroma down: keyword keeps answering, hybrid answers with BM25 and says so, semantic is 503
        chroma.stop()
        keyword = client.get("/search", params={"alias": "sci", "q": QUERY, "mode": "keyword"})
        assert keyword.status_code == 200 and keyword.json()["results"][0]["id"] == "4983"
        hybrid = client.get("/search", params={"alias": "sci", "q": QUERY}).json()
        assert hybrid["mode"] == "keyword" and "unavailable" in hybrid["degraded"]
        semantic = client.get("/search", params={"alias": "sci", "q": QUERY, "mode": "semantic"})
        assert semantic.status_code == 503 and "Chroma" in semantic.json()["detail"]
        assert client.get("/aliases").status_code == 503
        chroma.start()
        assert client.get("/search", params={"alias": "sci", "q": QUERY}).json()["mode"] == "hybrid"


def test_http_api_key_model_mismatch_and_persisted_index(
        tmp_path: Path, settings: Settings, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    start_workers(1)
    live = ingest(control, tmp_path, 60)
    keyed = settings.with_(api_key="s3cret-key")
    with TestClient(create_app(keyed)) as client:
        params = {"alias": "sci", "q": QUERY}
        assert client.get("/search", params=params).status_code == 401
        wrong = client.get("/search", params=params, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "s3cret" not in wrong.text
        ok = client.get("/search", params=params, headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200
        assert client.get("/metrics").status_code == 401  # metrics behind the key too
        assert client.get("/metrics", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert client.get("/healthz").status_code == 200  # liveness stays open for probes
        built_at = ok.json()["served_by"]["bm25_index"]["built_at"]
    # A second start loads the persisted index instead of rebuilding it.
    with TestClient(create_app(settings)) as client:
        again = client.get("/search", params={"alias": "sci", "q": QUERY, "mode": "keyword"}).json()
        assert again["served_by"]["bm25_index"]["built_at"] == built_at
    # A document written straight into the live collection reaches the BM25 index by a background
    # rebuild that is swapped in; queries keep being answered by the old index meanwhile.
    with TestClient(create_app(settings.with_(index_refresh_s=0.2))) as client:
        model = load_model(resolve_model("all-MiniLM-L6-v2"), settings.data_dir, "cpu")
        text = "Zymurgy: the chemistry of fermentation by brewing yeast"
        control.store.add(live, ids=["zz-new"], embeddings=model.embed_documents([text]), documents=[text],
                          metadatas=[{"source": "test"}])
        deadline, found = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            answer = client.get("/search", params={"alias": "sci", "q": "zymurgy", "mode": "keyword"})
            assert answer.status_code == 200
            if answer.json()["results"]:
                found = answer.json()
                break
            time.sleep(0.1)
        assert found is not None and found["results"][0]["id"] == "zz-new"
        assert found["served_by"]["bm25_index"]["documents"] == 61
    # The collection's record names another model's fingerprint: refused with 409, both models named.
    record = control.registry.get_collection(live)
    control.registry.put_collection(record.model_copy(update={"fingerprint": "sha256:0000"}))
    with TestClient(create_app(settings)) as client:
        refused = client.get("/search", params={"alias": "sci", "q": QUERY, "mode": "semantic"})
        assert refused.status_code == 409
        assert "sha256:0000" in refused.json()["detail"] and record.fingerprint in refused.json()["detail"]


def test_search_during_migration_never_mixes_models(
        tmp_path: Path, settings: Settings, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    start_workers(2)
    source = ingest(control, tmp_path, 300)
    target_model = str(need(M2V_MPNET))
    seen: list[dict] = []
    failures: list[str] = []
    stop = threading.Event()

    def query_forever(client: TestClient) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            response = client.get("/search", params={"alias": "sci", "q": QUERY, "k": 10})
            if response.status_code != 200:
                failures.append(response.text)
            else:
                seen.append({**response.json(), "seconds": time.perf_counter() - started})

    with TestClient(create_app(settings)) as client:
        thread = threading.Thread(target=query_forever, args=(client,))
        thread.start()
        try:
            migration = control.migrate("sci", target_model, batch_size=25, cutover="manual")
            assert control.wait(migration.id, timeout=600).state == MigrationState.COMPLETE
            during = len(seen)
            # The server prepared the target while it waited for its cutover: the switch waits for
            # no one, and only changes which prepared collection answers.
            deadline = time.monotonic() + 120
            while client.get("/healthz").json()["ready"]["sci"] != {"live": True, "canary": None, "next": True,
                                                                    "previous": None}:
                assert time.monotonic() < deadline, "the server never prepared the complete migration's target"
                time.sleep(0.2)
            prepared = len(seen)
            switched = control.cutover("sci")
            assert switched["catching_up"] == 0 and switched["search_not_ready"] == []
            time.sleep(2)
            after_cutover = len(seen)
            control.rollback("sci")
            time.sleep(2)
        finally:
            stop.set()
            thread.join(timeout=30)
    assert not failures
    assert during > 0 and after_cutover > during and len(seen) > after_cutover
    searcher = Searcher(settings)
    for answer in seen:
        served = answer["served_by"]
        record = searcher.collection_record(served["collection"])
        assert (served["model"], served["fingerprint"]) == (record.model, record.fingerprint)
        assert answer["mode"] == "hybrid" and answer["results"][0]["id"] == "4983"
    collections = [a["served_by"]["collection"] for a in seen]
    assert set(collections[:during]) == {source}
    assert migration.target_collection in collections[during:after_cutover]
    assert collections[-1] == source  # rolled back
    assert not any(a["served_by"]["standing_in_for"] for a in seen)  # every collection was prepared in time
    # The bound this test sets for a switch: no answer from the cutover on (through the rollback)
    # slower than twice the slowest answer while the migration kept both cores busy (and at
    # least half a second). Loading the model or building the index on the query path, as
    # before, took seconds. The preparation before the cutover runs beside the queries on the
    # same cores (its latency is for BENCHMARKS.md, not for a test to bound); since `wait` sees
    # `complete` the moment it is written, that span is no longer counted as the migration's.
    bound = max(0.5, 2 * max(a["seconds"] for a in seen[:during]))
    assert max(a["seconds"] for a in seen[prepared:]) <= bound


def test_a_search_process_not_ready_answers_from_the_collection_it_holds(
        tmp_path: Path, settings: Settings, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    start_workers(2)
    source = ingest(control, tmp_path, 100)
    migration = control.migrate("sci", str(need(M2V_MPNET)), batch_size=25, cutover="manual")
    # A server that prepares only at start-up (its upkeep never runs again): it never holds the target.
    with TestClient(create_app(settings.with_(index_refresh_s=3600))) as lagging:
        process = lagging.get("/healthz").json()["process"]
        assert control.wait(migration.id, timeout=600).state == MigrationState.COMPLETE
        switched = control.cutover("sci", search_wait_s=1.5)
        assert switched["search_not_ready"] == [process]  # waited 1.5 s for it, then switched
        assert control.registry.get_alias("sci").live_collection == migration.target_collection
        answer = lagging.get("/search", params={"alias": "sci", "q": QUERY}).json()
        assert answer["served_by"]["collection"] == source and answer["served_by"]["model"] == "all-MiniLM-L6-v2"
        assert answer["served_by"]["standing_in_for"] == migration.target_collection
        assert answer["results"][0]["id"] == "4983"
        # A process that starts now prepares the live collection before serving, and answers from it.
        with TestClient(create_app(settings)) as fresh:
            served = fresh.get("/search", params={"alias": "sci", "q": QUERY}).json()["served_by"]
            assert (served["collection"], served["standing_in_for"]) == (migration.target_collection, None)
            assert fresh.get("/healthz").json()["ready"]["sci"]["live"] is True
    assert readiness.processes(control.redis) == {}  # both withdrew on shutdown


def test_serve_with_two_workers_builds_each_index_once_and_counts_every_process(
        tmp_path: Path, settings: Settings, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    """``reembed serve --workers 2``: two processes on one socket, one BM25 build between them
    (the other maps what the first published), both ready in Redis, and one scrape of /metrics
    that counts the queries both answered."""
    start_workers(1)
    corpus = scifact_subset(tmp_path / "corpus.jsonl", 200)
    ingest_run = control.ingest("multi", corpus, str(need(M2V_MINILM)), batch_size=50)
    assert control.wait(ingest_run.id, timeout=300).state == MigrationState.LIVE
    live = control.registry.get_alias("multi").live_collection
    # Two managers of one folder (two processes): the second waits for the first's build and maps it.
    first, second = (IndexManager(tmp_path / "shared-bm25", Store.from_settings(settings)) for _ in range(2))
    waited: list[Bm25Index] = []
    with first._build_lock(live):
        waiting = threading.Thread(target=lambda: waited.append(second.ready(live)))
        waiting.start()
        time.sleep(1)
        assert waiting.is_alive(), "the second build did not wait for the first"
        built = first.rebuild(live)
    waiting.join(timeout=30)
    assert waited[0].built_at == built.built_at and len(waited[0]) == 200  # mapped, not built again
    data = tmp_path / "serve-data"  # no index built by anyone yet
    port = free_port()
    env = {**os.environ, **settings.to_env(), "REEMBED_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1",
           "REEMBED_SEARCH_MAX_IN_FLIGHT": "2"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--workers", "2"],
                                  env=env, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 180
        while len(seen) < 2:  # a new connection each time: the kernel spreads them over the processes
            assert server.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"processes answering: {seen}\n{log_path.read_text()}"
            with contextlib.suppress(httpx.TransportError):
                health = httpx.get(f"{base}/healthz", timeout=5).json()
                if health.get("ready"):
                    seen.add(health["process"])
            time.sleep(0.05)
        answered = 0
        for _ in range(40):
            response = httpx.get(f"{base}/search", params={"alias": "multi", "q": QUERY, "k": 5}, timeout=30)
            assert response.status_code == 200, response.text
            assert response.json()["served_by"]["collection"] == live
            answered += 1
        scrape = httpx.get(f"{base}/metrics", timeout=10).text
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
                      if line.startswith("reembed_search_queries_total{"))
        assert counted == answered, scrape  # not one process's share
        ready = readiness.processes(redis.Redis.from_url(settings.redis_url))
        assert len(ready) == 2 and all(live in held for held in ready.values()), ready
        assert len(list((data / "bm25" / live).glob("build-*"))) == 1

        # Overload: 24 batches of 50 queries at once against 2 x 2 admitted: the rest are told to
        # come back (503, Retry-After) at once rather than queued, and every process counts them.
        def batch(_: int) -> httpx.Response:
            return httpx.post(f"{base}/search", json={"alias": "multi", "q": [QUERY] * 50, "k": 10}, timeout=120)

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(batch, range(24)))
        refused = [a for a in answers if a.status_code == 503]
        assert {a.status_code for a in answers} == {200, 503}, [a.status_code for a in answers]
        assert all(a.headers["Retry-After"] == "1" and "REEMBED_SEARCH_MAX_IN_FLIGHT" in a.json()["detail"]
                   for a in refused)
        scrape = httpx.get(f"{base}/metrics", timeout=10).text
        assert sum(float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
                   if line.startswith("reembed_search_refused_total")) == len(refused), scrape
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    said = log_path.read_text()
    assert said.count('"bm25 index built"') == 1, said  # the second process mapped the first one's
    assert not list(data.glob("serve-metrics-*")), "the counters' folder is removed on shutdown"
