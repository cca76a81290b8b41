"""Integration fixtures: each test gets a flushed Redis database, a fresh Chroma server, workers."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cli.services import ChromaServer, Workers
from producer import ControlPlane
from reembed.settings import Settings
from tests.conftest import SCIFACT, TEST_REDIS_URL, need

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for extracted weights and fingerprint caches across tests."""
    return tmp_path_factory.mktemp("reembed-data")


def flushed_redis(url: str) -> redis.Redis:
    """A client of the database at ``url``, flushed; no Redis skips locally and fails in CI."""
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError:
        if os.environ.get("CI"):
            raise
        pytest.skip("no Redis on 127.0.0.1:6379")
    client.flushdb()
    return client


@pytest.fixture
def redis_url() -> Iterator[str]:
    client = flushed_redis(TEST_REDIS_URL)
    yield TEST_REDIS_URL
    client.flushdb()


@pytest.fixture
def chroma(tmp_path: Path) -> Iterator[ChromaServer]:
    server = ChromaServer(tmp_path / "chroma").start()
    yield server
    server.stop()


@pytest.fixture
def settings(redis_url: str, chroma: ChromaServer, models_dir: Path) -> Settings:
    return Settings.from_env({
        "REEMBED_REDIS_URL": redis_url, "REEMBED_CHROMA_URL": chroma.url, "REEMBED_DATA_DIR": str(models_dir),
        "REEMBED_DEVICE": "cpu", "REEMBED_LOG_FORMAT": "json", "REEMBED_MAX_WAITING_BATCHES": "4",
    })


@pytest.fixture
def start_workers(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., Workers]]:
    """Start worker processes (a real `celery worker` subprocess); all are stopped after the test."""
    started: list[Workers] = []

    def start(concurrency: int = 2, queues: str = "reembed.batches,reembed.control", **overrides: Any) -> Workers:
        s = settings.with_(**overrides) if overrides else settings
        w = Workers(s, concurrency, name=f"test{len(started)}-{time.monotonic_ns()}@%h", queues=queues)
        started.append(w.start(tmp_path / "worker.log"))
        return w

    yield start
    for w in started:
        w.stop(timeout=20)


@pytest.fixture
def control(settings: Settings) -> ControlPlane:
    return ControlPlane(settings)


def scifact_subset(path: Path, n: int) -> Path:
    """The first ``n`` SciFact documents as a BEIR file, with a metadata field added to check it is kept."""
    with open(need(SCIFACT / "corpus.jsonl")) as src, open(path, "w") as out:
        for i, line in zip(range(n), src):
            obj = json.loads(line)
            obj["metadata"] = {"source": "scifact", "position": i}
            out.write(json.dumps(obj) + "\n")
    return path
