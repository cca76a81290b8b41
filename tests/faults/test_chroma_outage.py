"""Fault 4: the Chroma server stopped for several seconds mid-migration, then started again.

Workers retry with backoff and finish; the HTTP search keeps answering in keyword mode (its BM25
index lives in memory) and says so, then serves hybrid again once Chroma is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from producer import ControlPlane
from reembed.progress import Progress
from cli.services import ChromaServer, Workers
from reembed.settings import Settings
from search.api import create_app
from tests.faults.conftest import BATCH, DOCS, check_outcome, ingest_source, wait_for_progress, wait_until

pytestmark = pytest.mark.integration

QUERY = "vitamin D deficiency and bone density"
OUTAGE_S = 8


def test_chroma_stopped_mid_migration_workers_retry_and_search_degrades_then_recovers(
        tmp_path: Path, settings: Settings, chroma: ChromaServer, control: ControlPlane,
        start_workers: Callable[..., Workers]) -> None:
    source, _ = ingest_source(tmp_path, control, start_workers)
    with TestClient(create_app(settings)) as client:
        before = client.get("/search", params={"alias": source.alias, "q": QUERY}).json()
        assert before["mode"] == "hybrid" and before["served_by"]["collection"] == source.collection
        # Given a migration under way
        migration = control.migrate(source.alias, source.target_model, batch_size=BATCH)
        wait_for_progress(control, migration.id, DOCS // 4)
        # When Chroma is stopped for several seconds
        chroma.stop()
        answers = []
        stop_at = time.monotonic() + OUTAGE_S
        while time.monotonic() < stop_at:
            answers.append(client.get("/search", params={"alias": source.alias, "q": QUERY}))
            time.sleep(0.5)
        # Then the search kept answering, from BM25, and said why
        assert answers and all(a.status_code == 200 for a in answers)
        assert all(a.json()["mode"] == "keyword" and "unavailable" in a.json()["degraded"] for a in answers)
        assert all(a.json()["results"] for a in answers)
        semantic = client.get("/search", params={"alias": source.alias, "q": QUERY, "mode": "semantic"})
        assert semantic.status_code == 503
        # ... and the migration neither failed nor finished meanwhile (its progress lives in Redis)
        stalled = Progress(control.redis, migration.id).get()
        assert stalled["state"] == "running" and int(stalled["done"]) < DOCS
        # When Chroma comes back, the workers' retries go through and the migration finishes
        chroma.start()
        check_outcome(control, source, migration)
        # ... and the search serves hybrid again, from the new collection
        wait_until("hybrid answers again", lambda: client.get(
            "/search", params={"alias": source.alias, "q": QUERY}).json()["mode"] == "hybrid", timeout=30)
        after = client.get("/search", params={"alias": source.alias, "q": QUERY}).json()
        assert after["served_by"]["collection"] == migration.target_collection
        assert after["degraded"] is None
