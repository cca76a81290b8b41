"""Fault-injection fixtures: a real migration of a few thousand documents with real faults.

Every test here runs real processes (``celery worker``, ``chroma run``, ``redis-server``), injects
one fault for real (SIGKILL, a stopped server, a poison document) and then checks the outcome
independently of reembed's own bookkeeping: ids are read straight from Chroma and every stored
vector is compared with the new model's embedding computed here.

The migration goes from one static model to another (m2v MiniLM -> m2v mpnet, 256-d each): fast
enough for 2,000 documents per test on two cores, yet every batch still goes through the queue,
a worker, the model and Chroma. Small batches (20) give ~100 batches, so a fault lands mid-run.
"""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import chromadb
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from producer import ControlPlane
from reembed.registry import MigrationRecord, MigrationState
from cli.services import Workers, free_port
from tests.conftest import M2V_MINILM, M2V_MPNET, need
from tests.integration.conftest import (  # noqa: F401 - fixtures shared with the integration tests
    chroma,
    control,
    models_dir,
    redis_url,
    scifact_subset,
    settings,
    start_workers,
)

pytestmark = pytest.mark.integration

#: Documents per fault scenario ("a few thousand"), and documents per batch.
DOCS = 2000
BATCH = 20
#: Redelivery of a batch whose worker died waits for this; short, so tests stay short.
VISIBILITY_S = 12


@functools.lru_cache(maxsize=2)
def reference_model(path: str) -> SentenceTransformer:
    return SentenceTransformer(path, device="cpu")


@dataclass
class Source:
    """An alias ingested with the first static model, ready to be migrated."""

    alias: str
    collection: str
    ids: set[str]
    target_model: str = field(default_factory=lambda: str(need(M2V_MPNET)))


def ingest_source(tmp_path: Path, plane: ControlPlane, start: Callable[..., Workers],
                  alias: str = "faults", n: int = DOCS) -> tuple[Source, list[Workers]]:
    """Ingest ``n`` SciFact documents with the m2v MiniLM model; return the two running worker
    processes (one pool process each, both consuming batches and control tasks)."""
    corpus = scifact_subset(tmp_path / "corpus.jsonl", n)
    workers = [start(1, visibility_timeout_s=VISIBILITY_S) for _ in range(2)]
    record = plane.ingest(alias, corpus, str(need(M2V_MINILM)), batch_size=250)
    final = plane.wait(record.id, timeout=300)
    assert final.state == MigrationState.LIVE, final.error
    ids = set(read_all(plane, record.target_collection)[0])
    assert len(ids) == n
    return Source(alias, record.target_collection, ids), workers


def read_all(plane: ControlPlane, collection: str) -> tuple[list[str], list[str], np.ndarray]:
    """Ids, texts and vectors straight from Chroma (not through reembed's store wrapper)."""
    port = int(plane.settings.chroma_url.rsplit(":", 1)[1])
    col = chromadb.HttpClient(host="127.0.0.1", port=port).get_collection(collection)
    raw = col.get(include=["documents", "embeddings"], limit=1_000_000)
    return list(raw["ids"]), list(raw["documents"]), np.asarray(raw["embeddings"])


def wait_until(what: str, check: Callable[[], bool], timeout: float = 120, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def wait_for_progress(plane: ControlPlane, migration_id: str, at_least: int, timeout: float = 120) -> int:
    """Block until ``at_least`` documents are done; fail if the migration finished first (the
    fault would then land on nothing and the test would prove nothing)."""
    def reached() -> bool:
        status = plane.status(migration_id)
        if status["state"] in ("complete", "live"):
            raise AssertionError("the migration finished before the fault was injected")
        return bool(status["done"] >= at_least)

    wait_until(f"{at_least} documents done", reached, timeout)
    return int(plane.status(migration_id)["done"])


def check_outcome(plane: ControlPlane, source: Source, migration: MigrationRecord,
                  failed: frozenset[str] = frozenset(), timeout: float = 300) -> MigrationRecord:
    """The four checks every fault ends with.

    1. the target's ids equal the source's, minus the recorded failures;
    2. every stored vector is the new model's embedding of its text (all, not a sample: the
       static model embeds 2,000 texts in a blink);
    3. the progress counters equal the truth;
    4. the alias points at the target.
    """
    final = plane.wait(migration.id, timeout=timeout)
    assert final.state == MigrationState.LIVE, f"{final.state}: {final.error}"
    ids, texts, vectors = read_all(plane, migration.target_collection)
    assert len(ids) == len(set(ids)), "duplicate ids in the target"
    assert set(ids) == source.ids - failed
    expected = reference_model(source.target_model).encode(texts, normalize_embeddings=True, batch_size=256)
    np.testing.assert_allclose(vectors, expected, atol=1e-3)
    status = plane.status(migration.id)
    assert (status["done"], status["failed"], status["skipped"], status["total"]) == (
        len(source.ids) - len(failed), len(failed), 0, len(source.ids))
    assert set(status["failures"]) <= failed
    assert plane.registry.get_alias(source.alias).live_collection == migration.target_collection
    return final


class RedisServer:
    """A `redis-server` process of the test's own (it can be killed and restarted), on a free port."""

    def __init__(self, path: Path, appendonly: bool) -> None:
        self.path = path
        self.port = free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, appendonly: bool | None = None) -> RedisServer:
        if appendonly is not None:
            self.appendonly = appendonly
        self.path.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.path),
             "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--logfile", str(self.path / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until("redis-server to answer", self._pings, timeout=20)
        return self

    def _pings(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=0.5).ping())
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        """SIGKILL: no chance to save anything beyond what the append-only file already holds."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def wipe(self) -> None:
        for file in self.path.glob("*"):
            if file.is_dir():
                for inner in file.glob("*"):
                    inner.unlink()
                file.rmdir()
            elif file.name != "redis.log":
                file.unlink()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.kill()
