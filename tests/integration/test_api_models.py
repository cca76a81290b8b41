"""Models behind an OpenAI-compatible API, against a real server this project did not write.

infinity serves all-MiniLM-L6-v2 on loopback (see embedding_server.py); reembed reaches it
through a fault proxy. Everything else is real too: Redis, ``chroma run``, ``celery worker``
processes reading the declaration from a models file. Outcomes are checked independently:
ids read straight from Chroma, every stored vector compared with the server's own answer for
the stored text, asked here without reembed's client.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
import pytest
import redis

from cli.services import ChromaServer, Workers
from producer import ControlPlane
from producer.plan import plan
from reembed.registry import MigrationState
from reembed.settings import Settings
from search.searcher import Searcher
from tests.conftest import M2V_MINILM, need
from tests.integration.conftest import scifact_subset
from tests.integration.embedding_server import FaultProxy, infinity_server, minilm_dir, server_vectors

API_MODEL = "infinity:minilm"
DOCS = 40


@pytest.fixture(scope="module")
def infinity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with infinity_server(tmp_path_factory.mktemp("infinity") / "infinity.log") as url:
        yield url


@pytest.fixture
def proxy(infinity: str) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(infinity)
    yield fault_proxy
    fault_proxy.close()


@pytest.fixture
def api_settings(settings: Settings, proxy: FaultProxy, tmp_path: Path) -> Settings:
    """The test settings plus a models file declaring the server (behind the proxy)."""
    file = tmp_path / "models.toml"
    file.write_text(f'''
[models."{API_MODEL}"]
base_url = "{proxy.url}"
model = "minilm"
dimension = 384
tokenizer = "{minilm_dir()}"
max_input_tokens = 256
max_inputs_per_request = 16
concurrency = 2
timeout_s = 5
max_retries = 6
''')
    return settings.with_(models_file_setting=str(file))


def stored(chroma: ChromaServer, collection: str) -> tuple[list[str], list[str], np.ndarray]:
    client = chromadb.HttpClient(host="127.0.0.1", port=chroma.port)
    got = client.get_collection(collection).get(include=["documents", "embeddings"])
    order = np.argsort(got["ids"])
    return ([got["ids"][i] for i in order], [got["documents"][i] for i in order],
            np.asarray(got["embeddings"], dtype=np.float32)[order])


def assert_server_vectors(chroma: ChromaServer, collection: str, infinity: str, ids: list[str]) -> None:
    """Every document exactly once, and its vector the server's own answer for its text."""
    got_ids, texts, vectors = stored(chroma, collection)
    assert got_ids == sorted(ids)
    expected = server_vectors(infinity, texts)
    assert np.abs(vectors - expected).max() < 1e-5


def wait_for(control: ControlPlane, migration_id: str, state: MigrationState) -> str:
    final = control.wait(migration_id, timeout=300)
    assert final.state == state, final.error
    return final.error or ""


def started(api_settings: Settings, start_workers: Callable[..., Workers], tmp_path: Path,
            ) -> tuple[ControlPlane, Path, list[str]]:
    """Two workers reading the models file, a control plane, and a DOCS-document corpus with its ids."""
    start_workers(2, models_file_setting=api_settings.models_file_setting)
    corpus = scifact_subset(tmp_path / "corpus.jsonl", DOCS)
    return ControlPlane(api_settings), corpus, [json.loads(line)["_id"] for line in corpus.read_text().splitlines()]


def test_an_api_model_ingests_migrates_both_ways_and_serves_search(
        api_settings: Settings, chroma: ChromaServer, infinity: str, proxy: FaultProxy,
        start_workers: Callable[..., Workers], tmp_path: Path) -> None:
    control, corpus, ids = started(api_settings, start_workers, tmp_path)

    ingest = control.ingest("papers", corpus, API_MODEL, batch_size=20)
    wait_for(control, ingest.id, MigrationState.LIVE)
    assert_server_vectors(chroma, ingest.target_collection, infinity, ids)
    config = control.store.configuration(ingest.target_collection)["embedding_function"]
    assert config["name"] == "openai" and config["config"]["api_base"] == proxy.url  # for direct readers

    searcher = Searcher(api_settings)
    title = json.loads(corpus.read_text().splitlines()[3])["title"]
    hits = searcher.search("papers", title, 5, "semantic")
    assert ids[3] in [h.id for h in hits.results][:3]
    searcher.close()

    away = control.migrate("papers", str(need(M2V_MINILM)), batch_size=20, cutover="manual")
    wait_for(control, away.id, MigrationState.COMPLETE)
    control.cutover("papers")

    # Back to the API model, through 429s (with retry-after), 500s, a dropped connection and a
    # stall longer than the client's timeout (5 s).
    proxy.faults = [("429", 1), ("429", 1), ("500",), ("drop",), None, ("500",), ("stall", 6), ("429", 2)]
    back = control.migrate("papers", API_MODEL, batch_size=20, cutover="manual")
    wait_for(control, back.id, MigrationState.COMPLETE)
    assert_server_vectors(chroma, back.target_collection, infinity, ids)
    assert proxy.served.get("429") == 3 and proxy.served.get("drop") == 1 and proxy.served.get("stall") == 1


def test_a_wrong_dimension_or_a_swapped_model_stops_with_nothing_mixed(
        api_settings: Settings, chroma: ChromaServer, infinity: str, proxy: FaultProxy,
        start_workers: Callable[..., Workers], tmp_path: Path) -> None:
    control, corpus, ids = started(api_settings, start_workers, tmp_path)
    ingest = control.ingest("papers", corpus, str(need(M2V_MINILM)), batch_size=20)
    wait_for(control, ingest.id, MigrationState.LIVE)

    # plan: the endpoint's rate measured on a sample, capped by the declared limit (60 requests a
    # minute of 15 documents and the probe: 15 documents/s), priced (nothing: no price declared).
    file = Path(api_settings.models_file_setting)
    file.write_text(file.read_text() + "requests_per_minute = 60\n")
    planned = plan(api_settings, "papers", API_MODEL, workers=2, sample=20)
    assert planned["rate_limit_docs_per_s"] == 15.0 and planned["docs_per_s"] <= 15.0
    assert planned["api_request_s"] > 0 and planned["api_requests_measured"] >= 1
    assert planned["tokens"] > 0 and planned["api_cost"] == 0.0 and planned["device"] == "api"

    # Every answer from the 4th on is one dimension short: a request the client gave up on (a
    # timeout on a loaded machine) is retried into the same fault, never past it.
    proxy.faults = [None, None, None] + [("dimension",)] * 100
    record = control.migrate("papers", API_MODEL, batch_size=10, cutover="manual")
    error = wait_for(control, record.id, MigrationState.FAILED)
    assert "383-d vector where the model is declared 384-d" in error
    proxy.faults = []
    _, texts, vectors = stored(chroma, record.target_collection)
    if texts:  # what was written before the stop is the server's true answer: nothing mixed
        assert np.abs(vectors - server_vectors(infinity, texts)).max() < 1e-5

    # The other worker may still be inside a request of the failed run: its wrong answer would
    # fail the resumed run with the old reason. Resume once no request has come for 2 s.
    seen, settled_by = -1, time.monotonic() + 60
    while proxy.requests != seen and time.monotonic() < settled_by:
        seen = proxy.requests
        time.sleep(2.0)
    proxy.swap_after = proxy.requests  # the endpoint now serves another model
    control.resume(record.id)
    error = wait_for(control, record.id, MigrationState.FAILED)
    assert "the model behind it changed" in error
    _, texts, vectors = stored(chroma, record.target_collection)
    assert np.abs(vectors - server_vectors(infinity, texts)).max() < 1e-5

    proxy.swap_after = None  # the right model is back: the same migration completes
    control.resume(record.id)
    wait_for(control, record.id, MigrationState.COMPLETE)
    assert_server_vectors(chroma, record.target_collection, infinity, ids)


def test_the_rate_limit_is_shared_by_every_process_of_an_endpoint(redis_url: str) -> None:
    """Two limiters on one endpoint (two workers) draw from the same buckets, in Redis."""
    import redis

    from reembed.rate_limit import RedisLimiter

    client = redis.Redis.from_url(redis_url)
    first, second = (RedisLimiter(client, "reembed:ratelimit:test", 60, 0) for _ in range(2))
    # 60 requests a minute hold 6 s of allowance: 6 requests go at once, from either worker.
    waits = [limiter._run("acquire", 100) for limiter in (first, second) * 3]
    assert waits == [0.0] * 6
    assert 0.5 < second._run("acquire", 100) <= 1.0  # the 7th waits for the next second's refill
    first.throttled(5.0)  # a 429 asked for 5 s: nobody sends meanwhile
    assert 4.0 < second._run("acquire", 100) <= 5.0
    tokens = RedisLimiter(client, "reembed:ratelimit:tokens", 0, 60_000)  # 6,000 tokens of allowance
    assert tokens._run("acquire", 5_000) == 0.0
    assert 0.5 < tokens._run("acquire", 5_000) <= 5.0  # 4,000 more tokens take 4 s to refill
    tokens.observe({"x-ratelimit-remaining-tokens": "0"})  # the server's stricter view wins
    assert tokens._run("acquire", 500) > 0  # 500 tokens: half a second of refill, not one millisecond
    assert not [k for k in client.keys("reembed:ratelimit:*") if b"http" in k]  # a digest, never a URL


def test_the_budget_pauses_within_one_request_and_resume_raises_it(
        api_settings: Settings, chroma: ChromaServer, infinity: str, proxy: FaultProxy,
        start_workers: Callable[..., Workers], tmp_path: Path) -> None:
    # A price per million tokens (infinity reports characters as its tokens), one request at a
    # time: the spend may pass the limit by at most the one request in flight when it was reached.
    file = Path(api_settings.models_file_setting)
    file.write_text(file.read_text().replace("concurrency = 2", "concurrency = 1\nprice_per_million_tokens = 1.0"))
    start_workers(1, models_file_setting=api_settings.models_file_setting)
    control = ControlPlane(api_settings)
    corpus = scifact_subset(tmp_path / "corpus.jsonl", 60)
    ids = [json.loads(line)["_id"] for line in corpus.read_text().splitlines()]
    texts = sorted((json.loads(line)["title"] + json.loads(line)["text"] for line in corpus.read_text().splitlines()),
                   key=len)
    one_request = (sum(len(t) for t in texts[-16:]) + 200) / 1e6  # the costliest request, generously
    limit = 0.04

    record = control.ingest("papers", corpus, API_MODEL, batch_size=20, max_cost=limit)
    deadline = time.monotonic() + 120
    while (status := control.status(record.id))["state"] != "paused" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status["state"] == "paused" and "reached its budget" in status["error"]
    time.sleep(2)  # nothing more goes out while paused
    status = control.status(record.id)
    assert limit - one_request < status["cost"] <= limit + one_request and status["tokens"] > 0
    assert status["max_cost"] == limit

    # Redis restarts empty while it is paused: the spend is kept in Chroma, and a resume with the
    # same budget sends nothing (it would otherwise spend the whole budget a second time).
    redis.Redis.from_url(api_settings.redis_url).flushdb()
    lost = control.status(record.id)
    assert not lost["progress_in_redis"] and abs(lost["cost"] - status["cost"]) <= one_request, lost
    sent = proxy.requests
    control.resume(record.id, max_cost=limit)
    deadline = time.monotonic() + 60
    while (again := control.status(record.id))["state"] != "paused" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert again["state"] == "paused" and "reached its budget" in again["error"], again
    assert proxy.requests == sent and again["cost"] >= lost["cost"]

    control.resume(record.id, max_cost=1.0)
    wait_for(control, record.id, MigrationState.LIVE)
    assert_server_vectors(chroma, record.target_collection, infinity, ids)
    assert control.status(record.id)["cost"] <= 1.0


def test_the_embedded_stack_reads_the_models_file_and_never_shows_the_key(
        proxy: FaultProxy, infinity: str, tmp_path: Path) -> None:
    """What a new user runs: the data folder's own Redis and Chroma, the declaration in its
    default place (DATA_DIR/models.toml), the key in the environment; the key is sent, never shown."""
    import subprocess
    import sys

    secret = "sk-embedded-3f9a1c77e2b84d0c"
    data = tmp_path / "data"
    data.mkdir()
    (data / "models.toml").write_text(
        f'[models."{API_MODEL}"]\nbase_url = "{proxy.url}"\nmodel = "minilm"\ndimension = 384\n'
        f'api_key_env = "TEST_EMBEDDINGS_KEY"\ntokenizer = "{minilm_dir()}"\nmax_input_tokens = 256\n'
        'price_per_million_tokens = 0.5\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("REEMBED_")}
    env.update(REEMBED_DATA_DIR=str(data), HF_HUB_OFFLINE="1", REEMBED_LOG_FORMAT="json",
               TEST_EMBEDDINGS_KEY=secret)
    corpus = scifact_subset(tmp_path / "corpus.jsonl", 30)

    def reembed(*args: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "cli.main", *args, "--json"], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert secret not in done.stdout + done.stderr
        return dict(json.loads(done.stdout))

    listed = {m["name"]: m for m in reembed("models")["models"]}
    assert listed[API_MODEL]["installed"] and listed[API_MODEL]["api_key_env"] == "TEST_EMBEDDINGS_KEY"
    status = reembed("ingest", "papers", str(corpus), "--model", API_MODEL, "--wait")
    assert status["state"] == "live" and status["done"] == 30 and status["tokens"] > 0 and status["cost"] > 0
    title = json.loads(corpus.read_text().splitlines()[5])["title"]
    hits = reembed("search", "papers", title, "--mode", "semantic")
    assert json.loads(corpus.read_text().splitlines()[5])["_id"] in [h["id"] for h in hits["results"]][:3]
    assert proxy.authorizations == {f"Bearer {secret}"}
    for file in data.rglob("*"):  # logs, Chroma's files, the embedded Redis's dump
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), file


def test_adopt_reads_chroma_s_openai_configuration(
        api_settings: Settings, chroma: ChromaServer, infinity: str, proxy: FaultProxy,
        start_workers: Callable[..., Workers], tmp_path: Path) -> None:
    """A collection an application made with Chroma's OpenAIEmbeddingFunction (here: pointed at the
    same server) is adopted under the declared model its persisted configuration names."""
    from reembed.errors import ModelNotFoundError
    from reembed.store import lazy_openai

    start_workers(1, models_file_setting=api_settings.models_file_setting)
    control = ControlPlane(api_settings)
    rows = [json.loads(line) for line in scifact_subset(tmp_path / "c.jsonl", 20).read_text().splitlines()]
    texts = [r["title"] + " " + r["text"] for r in rows]
    client = chromadb.HttpClient(host="127.0.0.1", port=chroma.port)
    for name, model_name in (("app-docs", "minilm"), ("other-docs", "text-embedding-3-large")):
        recorded = lazy_openai()(model_name=model_name, api_base=proxy.url, api_key_env_var="APP_KEY")
        made = client.create_collection(name, configuration={"embedding_function": recorded, "hnsw": {"space": "cosine"}})
        made.add(ids=[r["_id"] for r in rows], documents=texts, embeddings=server_vectors(infinity, texts))

    adopted = control.adopt("app", "app-docs")
    assert adopted["model"] == API_MODEL
    with pytest.raises(ModelNotFoundError, match='models."openai:text-embedding-3-large"'):
        control.adopt("other", "other-docs")


def test_a_matryoshka_cut_takes_the_stored_vectors_after_checking_a_sample(
        api_settings: Settings, chroma: ChromaServer, infinity: str, proxy: FaultProxy,
        start_workers: Callable[..., Workers], tmp_path: Path) -> None:
    """The live API model at fewer dimensions: the stored vectors cut and re-normalised, no
    document sent but the sample checked first; refused when the sample disagrees."""
    from reembed.errors import InputError
    from reembed.matryoshka import SAMPLE, unit_rows
    from reembed.models import PROBE_TEXT

    file = Path(api_settings.models_file_setting)
    file.write_text(file.read_text() + "matryoshka = true\n")
    control, corpus, ids = started(api_settings, start_workers, tmp_path)
    ingest = control.ingest("papers", corpus, API_MODEL, batch_size=20)
    wait_for(control, ingest.id, MigrationState.LIVE)

    planned = plan(api_settings, "papers", f"{API_MODEL}@128", workers=2, sample=10)
    assert planned["shortcut"] == "matryoshka" and planned["bound_by"] == "chroma" and planned["api_cost"] == 0
    sent, requests = len(proxy.inputs), len(proxy.dimensions)
    record = control.migrate("papers", None, batch_size=20, cutover="manual", dimensions=128)
    assert record.to_model == f"{API_MODEL}@128" and record.shortcut == "matryoshka"
    wait_for(control, record.id, MigrationState.COMPLETE)
    documents = {t for t in proxy.inputs[sent:] if t != PROBE_TEXT}
    assert 0 < len(documents) <= SAMPLE < len(ids)  # the sample only: no document embedded by the workers
    assert set(proxy.dimensions[requests:]) == {128}  # every request since asked for 128
    got_ids, texts, vectors = stored(chroma, record.target_collection)
    assert got_ids == sorted(ids) and vectors.shape == (len(ids), 128)
    # Independently: what the server answers at 128 dimensions (infinity cuts without
    # re-normalising), normalised, is what was stored.
    assert np.abs(vectors - unit_rows(server_vectors(infinity, texts, dimensions=128))).max() < 1e-5
    control.cutover("papers")
    searcher = Searcher(api_settings)
    title = json.loads(corpus.read_text().splitlines()[3])["title"]
    hits = searcher.search("papers", title, 5, "semantic")
    assert hits.served_by.model == f"{API_MODEL}@128" and ids[3] in [h.id for h in hits.results][:3]
    searcher.close()

    # Another model behind the endpoint now: the sample disagrees, nothing starts.
    proxy.swap_after = proxy.requests
    migrations = len(control.history("papers")["migrations"])
    with pytest.raises(InputError, match="--re-embed"):
        control.migrate("papers", None, dimensions=64)
    assert len(control.history("papers")["migrations"]) == migrations
    # The endpoint fixed, --re-embed sends every document (no shortcut) at the smaller size.
    proxy.swap_after = None
    sent = len(proxy.inputs)
    again = control.migrate("papers", f"{API_MODEL}@64", batch_size=20, cutover="manual", re_embed=True)
    assert again.shortcut is None
    wait_for(control, again.id, MigrationState.COMPLETE)
    assert len({t for t in proxy.inputs[sent:] if t != PROBE_TEXT}) >= len(ids)  # (long ones cut to 256 tokens)
