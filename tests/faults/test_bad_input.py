"""Bad input through the real CLI and HTTP service: each gets a clear error and changes nothing.

The CLI runs as a subprocess against the real Redis and Chroma; after each refusal the test
checks that no alias, migration or collection appeared. The HTTP API is fuzzed from its own
OpenAPI schema with schemathesis (positive and negative cases, a bounded number): no 500s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import chromadb
import httpx
import pytest
import uvicorn

from producer import ControlPlane
from reembed.registry import MigrationState
from cli.services import Workers, free_port
from reembed.settings import Settings
from search.api import MAX_BODY_BYTES, create_app
from tests.conftest import M2V_MINILM, M2V_MPNET, need
from tests.faults.conftest import read_all, wait_until

pytestmark = pytest.mark.integration


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env(), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=180)


def collections(settings: Settings) -> set[str]:
    """Every collection but the registry's own (created empty on first use, holds no record)."""
    port = int(settings.chroma_url.rsplit(":", 1)[1])
    return {c.name for c in chromadb.HttpClient(host="127.0.0.1", port=port).list_collections()} - {"reembed-registry"}


def write_jsonl(path: Path, rows: list[object] | list[bytes]) -> Path:
    with open(path, "wb") as out:
        for row in rows:
            out.write(row if isinstance(row, bytes) else json.dumps(row).encode())
            out.write(b"\n")
    return path


GOOD = {"id": "ok", "text": "a perfectly fine document"}
BAD_FILES: dict[str, tuple[list[object] | list[bytes], str]] = {
    "empty string": ([GOOD, {"id": "e", "text": ""}], "no text"),
    "whitespace only": ([GOOD, {"id": "w", "text": "  \t "}], "no text"),
    "no text field": ([GOOD, {"id": "n"}], "no 'text' string"),
    "invalid utf-8": ([json.dumps(GOOD).encode(), b'{"id": "u", "text": "caf\xe9"}'], "not valid UTF-8"),
    "raw control character": ([GOOD, b'{"id": "c", "text": "bell \x07 here"}'], "not a JSON object"),
    "escaped control character": ([GOOD, {"id": "c", "text": "nul \u0000 here"}], "control character U+0000"),
    "duplicate ids": ([GOOD, GOOD], "duplicate id 'ok'"),
    "list metadata": ([{**GOOD, "metadata": {"tags": ["a", "b"]}}], "metadata 'tags' is list"),
    "nested metadata": ([{**GOOD, "metadata": {"m": {"a": 1}}}], "metadata 'm' is dict"),
    "None metadata value": ([{**GOOD, "metadata": {"m": None}}], "metadata 'm' is NoneType"),
    "reserved metadata key": ([{**GOOD, "metadata": {"content_hash": "x"}}], "reserved"),
    "not an object": ([GOOD, [1, 2]], "expected a JSON object"),
    "empty file": ([], "holds no documents"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_corpus_files_are_refused_and_change_nothing(tmp_path: Path, settings: Settings, control: ControlPlane,
                                                        case: str) -> None:
    rows, needle = BAD_FILES[case]
    before = collections(settings)
    result = run_cli(settings, "ingest", "bad", str(write_jsonl(tmp_path / "c.jsonl", rows)),
                     "--model", str(need(M2V_MINILM)))
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert collections(settings) == before  # no collection written
    assert control.registry.aliases() == [] and control.registry.migrations("bad") == []


def test_bad_names_models_and_sizes_are_refused_and_change_nothing(
        tmp_path: Path, settings: Settings, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": f"document {i}"} for i in range(30)])
    start_workers(1)
    live = control.ingest("good", corpus, str(need(M2V_MINILM)))
    assert control.wait(live.id, timeout=120).state == MigrationState.LIVE
    # An unowned copy of the alias's collection (same vectors): what adopt may take, and check
    port = int(settings.chroma_url.rsplit(":", 1)[1])
    client = chromadb.HttpClient(host="127.0.0.1", port=port)
    raw = client.get_collection(live.target_collection).get(include=["documents", "metadatas", "embeddings"])
    copy = "unowned-copy"
    client.create_collection(copy).add(ids=raw["ids"], documents=raw["documents"], metadatas=raw["metadatas"],
                                       embeddings=raw["embeddings"])
    before = collections(settings)
    refusals = {
        ("ingest", "bad alias!", str(corpus), "--model", str(need(M2V_MINILM))): "alias 'bad alias!' is not valid",
        ("ingest", "x" * 65, str(corpus), "--model", str(need(M2V_MINILM))): "is not valid",
        ("ingest", "new", str(corpus), "--model", "no-such-model"): "unknown model 'no-such-model'",
        ("ingest", "new", str(corpus), "--model", str(tmp_path)): "not a sentence-transformers model",
        ("ingest", "good", str(corpus), "--model", str(need(M2V_MINILM))): "already exists",
        ("migrate", "good", "--to", str(need(M2V_MPNET)), "--batch-size", "-5"): "batch size -5 is out of range",
        ("migrate", "good", "--to", str(need(M2V_MPNET)), "--batch-size", "10000000"): "out of range",
        ("migrate", "good", "--to", str(need(M2V_MINILM))): "already embedded with",
        ("migrate", "nope", "--to", str(need(M2V_MPNET))): "alias 'nope'",
        ("adopt", "other", "--collection", "no such collection!"): "no such collection!",
        ("adopt", "other", "--collection", copy, "--model", str(need(M2V_MPNET))):
            "was not embedded with",  # same dimension, another model: caught by re-embedding
        ("adopt", "other", "--collection", copy, "--model", "all-MiniLM-L6-v2"): "384",
        ("adopt", "other", "--collection", live.target_collection, "--model", str(need(M2V_MINILM))):
            "belongs to alias 'good'",  # one collection, one alias
    }
    for args, needle in refusals.items():
        result = run_cli(settings, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert needle in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert collections(settings) == before
    assert [a.alias for a in control.registry.aliases()] == ["good"]
    env_bad = run_cli(settings.with_(), "status", "good")
    assert env_bad.returncode == 0
    bad_setting = subprocess.run([sys.executable, "-m", "cli.main", "status"], capture_output=True, text=True,
                                 env={**os.environ, **settings.to_env(), "REEMBED_BATCH_SIZE": "-1"}, timeout=60)
    assert bad_setting.returncode == 2 and "REEMBED_BATCH_SIZE" in bad_setting.stderr


def test_one_megabyte_document_is_truncated_with_a_recorded_warning(
        tmp_path: Path, settings: Settings, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    # Given a corpus with a 1 MB document and a model that reads 256 tokens
    huge = " ".join(f"word{i % 5000}" for i in range(120_000))
    assert len(huge) > 1_000_000
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "huge", "text": huge}]
                         + [{"id": f"d{i}", "text": f"short document {i}"} for i in range(20)])
    start_workers(1)
    # When it is ingested
    record = control.ingest("huge", corpus, "all-MiniLM-L6-v2", batch_size=8)
    # Then the ingest completes, the document is stored whole, and its truncation is recorded
    assert control.wait(record.id, timeout=300).state == MigrationState.LIVE
    ids, texts, _ = read_all(control, record.target_collection)
    assert len(ids) == 21 and max(len(t) for t in texts) == len(huge)
    status = control.status(record.id)
    assert status["truncated"] == 1 and status["truncated_tokens"]["huge"] > 256
    assert "documents truncated by the model" in (tmp_path / "worker.log").read_text()


@pytest.fixture
def served(tmp_path: Path, settings: Settings, control: ControlPlane,
           start_workers: Callable[..., Workers]) -> Iterator[str]:
    """The real search service on a loopback port, over an alias of 30 documents."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": f"document number {i} about cells"}
                                                for i in range(30)])
    start_workers(1)
    control.wait(control.ingest("fuzz", corpus, str(need(M2V_MINILM))).id, timeout=120)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until("the service to answer", lambda: _answers(url), timeout=60)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_http_api_fuzzed_from_its_openapi_schema_never_answers_500(served: str) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hypothesis_settings
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(served + "/openapi.json")
    seen: dict[int, int] = {}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @hypothesis_settings(max_examples=150, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(generation_mode=mode))
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call(timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])

        fuzz()
    assert seen.get(200, 0) > 0 and seen.get(422, 0) > 0, seen  # the fuzz reached both sides


def test_oversized_and_malformed_http_requests_are_refused(served: str) -> None:
    with httpx.Client(base_url=served, timeout=30) as client:
        too_big = client.post("/search", content=b"x" * (MAX_BODY_BYTES + 1),
                              headers={"content-type": "application/json"})
        assert too_big.status_code == 413
        assert client.post("/search", content=b"{not json", headers={"content-type": "application/json"}
                           ).status_code == 422
        assert client.post("/search", json={"alias": "fuzz", "q": ["ok"] * 101}).status_code == 422
        assert client.post("/search", json={"alias": "fuzz", "q": ["x" * 10_001]}).status_code == 422
        assert client.get("/search", params={"alias": "fuzz", "q": "\x00"}).status_code in (200, 422)
        long_alias = client.get("/search", params={"alias": "a" * 513, "q": "x"})
        assert long_alias.status_code == 422 and "aaaa" not in long_alias.text  # input not echoed
        # A streamed body without Content-Length is cut off too
        def chunks() -> Iterator[bytes]:
            for _ in range(MAX_BODY_BYTES // 65536 + 2):
                yield b" " * 65536
        streamed = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code in (400, 413)
        assert client.get("/healthz").status_code == 200  # and the service is still there
    time.sleep(0)
