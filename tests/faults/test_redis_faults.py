"""Fault 3: Redis killed mid-migration (or mid-ingest), restarted with its append-only file, or with nothing.

These tests run a `redis-server` of their own (``own_redis``) so they can SIGKILL it; every
process of the test (workers, the control plane) talks to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from producer import ControlPlane
from cli.services import Workers
from tests.conftest import M2V_MINILM, need
from tests.faults.conftest import (
    BATCH,
    DOCS,
    VISIBILITY_S,
    RedisServer,
    Source,
    check_outcome,
    ingest_source,
    scifact_subset,
    wait_for_progress,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_url(own_redis: RedisServer) -> Iterator[str]:
    """Overrides the shared-Redis fixture: this module's processes use the killable server."""
    yield own_redis.url


def test_redis_killed_and_restarted_with_append_only_file_loses_nothing(
        tmp_path: Path, control: ControlPlane, start_workers: Callable[..., Workers],
        own_redis: RedisServer) -> None:
    # Given a migration running against a Redis with appendonly yes, appendfsync always
    source, _ = ingest_source(tmp_path, control, start_workers)
    migration = control.migrate(source.alias, source.target_model, batch_size=BATCH)
    before = wait_for_progress(control, migration.id, DOCS // 4)
    # When Redis is SIGKILLed, stays down a few seconds, and comes back from its append-only file
    own_redis.kill()
    time.sleep(4)
    own_redis.start()
    # Then progress survived the restart, and the workers reconnect and finish the migration
    assert control.status(migration.id)["done"] >= before
    check_outcome(control, source, migration)


def test_redis_restarted_empty_then_resume_finishes_by_diffing(
        tmp_path: Path, control: ControlPlane, start_workers: Callable[..., Workers],
        own_redis: RedisServer) -> None:
    # Given a migration running against a Redis that keeps nothing on disk
    own_redis.kill()
    own_redis.wipe()
    own_redis.start(appendonly=False)
    source, _ = ingest_source(tmp_path, control, start_workers)
    migration = control.migrate(source.alias, source.target_model, batch_size=BATCH)
    wait_for_progress(control, migration.id, DOCS // 4)
    # When Redis is killed and restarted empty: queue, progress and locks are gone
    own_redis.kill()
    own_redis.wipe()
    own_redis.start()
    time.sleep(3)  # let the workers reconnect and drop what they held (progress is gone)
    # Then status says the progress is lost and how to fix it
    status = control.status(migration.id)
    assert status["progress_in_redis"] is False and "reembed resume" in status["hint"]
    # ... and resume rebuilds from the durable records in Chroma, re-feeding only what is missing
    control.resume(migration.id)
    check_outcome(control, source, migration)


def test_redis_restarted_empty_during_an_ingest_finishes_it_exactly_once(
        tmp_path: Path, control: ControlPlane, start_workers: Callable[..., Workers],
        own_redis: RedisServer) -> None:
    # Given an ingest of 2,000 documents in batches of 20 against a Redis that keeps nothing on
    # disk, fed by the producer (in a thread here, as `reembed ingest` does) to two workers
    own_redis.kill()
    own_redis.wipe()
    own_redis.start(appendonly=False)
    for _ in range(2):
        start_workers(1, visibility_timeout_s=VISIBILITY_S)
    corpus = scifact_subset(tmp_path / "corpus.jsonl", DOCS)
    with ThreadPoolExecutor(1) as pool:
        feeding = pool.submit(control.ingest, "ingested", corpus, str(need(M2V_MINILM)), BATCH)
        wait_until("the ingest to be registered", lambda: bool(control.registry.migrations("ingested")), timeout=60)
        record = control.registry.migrations("ingested")[0]
        wait_for_progress(control, record.id, DOCS // 4)
        assert not feeding.done(), "the producer finished feeding before the fault; the test proves nothing"
        # When Redis is SIGKILLed with batches in flight, stays down, and comes back empty
        own_redis.kill()
        own_redis.wipe()
        time.sleep(3)
        own_redis.start()
        # Then the producer rebuilds the progress and feeds again; nothing is lost or doubled
        assert feeding.result(timeout=300).id == record.id
    ids = {json.loads(line)["_id"] for line in corpus.read_text().splitlines()}
    check_outcome(control, Source("ingested", "", ids, target_model=str(need(M2V_MINILM))), record)
