"""What operators look at, against the real stack: /metrics, structured worker logs, status --watch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from producer import ControlPlane
from reembed.registry import MigrationState
from cli.services import Workers
from reembed.settings import Settings
from search.api import create_app
from tests.conftest import M2V_MINILM, M2V_MPNET, need
from tests.integration.conftest import scifact_subset

pytestmark = pytest.mark.integration


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_logs_and_watch_during_a_migration(
        tmp_path: Path, settings: Settings, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    corpus = scifact_subset(tmp_path / "corpus.jsonl", 400)
    start_workers(1)
    ingest = control.ingest("ops", corpus, str(need(M2V_MINILM)), batch_size=50)
    assert control.wait(ingest.id, timeout=300).state == MigrationState.LIVE
    with TestClient(create_app(settings)) as client:
        # Given some queries answered
        for _ in range(3):
            assert client.get("/search", params={"alias": "ops", "q": "cancer cells", "mode": "hybrid"}).status_code == 200
        assert client.get("/search", params={"alias": "ops", "q": "cancer", "mode": "keyword"}).status_code == 200
        assert client.get("/search", params={"alias": "nope", "q": "x"}).status_code == 404
        # ... and a migration held paused, so its progress is on show
        migration = control.migrate("ops", str(need(M2V_MPNET)), batch_size=20)
        control.pause(migration.id)
        # Then /metrics counts queries by mode and status, times them, and shows the state
        found = samples(client.get("/metrics").text)
        assert found[("reembed_search_queries_total", (("answered", "hybrid"), ("mode", "hybrid"), ("status", "200")))] == 3
        assert found[("reembed_search_queries_total", (("answered", "keyword"), ("mode", "keyword"), ("status", "200")))] == 1
        assert found[("reembed_search_queries_total", (("answered", "none"), ("mode", "hybrid"), ("status", "404")))] == 1
        assert found[("reembed_search_latency_seconds_count", (("mode", "hybrid"),))] == 4
        live = ingest.target_collection
        assert found[("reembed_alias_live", (("alias", "ops"), ("collection", live), ("model", str(need(M2V_MINILM)))))] == 1
        assert found[("reembed_bm25_index_age_seconds", (("collection", live),))] >= 0
        assert found[("reembed_bm25_index_documents", (("collection", live),))] == 400
        labels = (("alias", "ops"), ("kind", "total"), ("migration_id", migration.id))
        assert found[("reembed_migration_documents", labels)] == 400
        assert ("reembed_migration_rate_docs_per_second", (("alias", "ops"), ("migration_id", migration.id))) in found
        assert found[("reembed_state_up", ())] == 1
        # ... /aliases shows the same migration
        row = client.get("/aliases").json()["aliases"][0]
        assert row["migration"]["migration_id"] == migration.id and row["migration"]["state"] == "paused"
    # When it resumes and an operator watches it
    start_workers(1)
    control.resume(migration.id)
    env = {**os.environ, **settings.to_env(), "HF_HUB_OFFLINE": "1"}
    watched = subprocess.run([sys.executable, "-m", "cli.main", "status", "ops", "--watch", "--interval", "0.5"],
                             env=env, capture_output=True, text=True, timeout=300)
    # Then --watch drew a progress bar until the migration ended, and exited by itself
    assert watched.returncode == 0, watched.stderr
    last = watched.stdout.strip().splitlines()[-1]
    assert "100.0%" in last and "400/400" in last and ("live" in last or "complete" in last) and "[####" in last
    # And every log line of a batch task names its migration, alias, batch and worker
    lines = [json.loads(x) for x in (tmp_path / "worker.log").read_text().splitlines() if x.startswith("{")]
    batch_lines = [x for x in lines if x.get("batch")]
    assert any(x.get("logger") == "celery.app.trace" for x in batch_lines)  # Celery's own lines too
    assert {x["event"] for x in batch_lines} >= {"batch done"}
    for x in batch_lines:
        assert {"migration_id", "alias", "batch", "worker"} <= set(x), x
    ours = [x for x in lines if x.get("logger") == "worker.tasks"]
    assert ours and all("migration_id" in x and "worker" in x for x in ours)
    # ... and each worker process said which model it runs, with its fingerprint, device and batch
    loaded = [x for x in lines if x["event"] == "model loaded"]
    assert {x["model"] for x in loaded} >= {str(need(M2V_MINILM)), str(need(M2V_MPNET))}
    assert all(x["fingerprint"].startswith("sha256:") and x["device"] == "cpu"
               and x["embed_batch_size"] == 1024 for x in loaded)  # both static models: calls of 1,024


def test_flower_shows_the_tasks_by_their_stable_names(
        tmp_path: Path, settings: Settings, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    import httpx

    from cli.services import free_port
    from tests.faults.conftest import wait_until

    port = free_port()
    env = {**os.environ, **settings.to_env(), "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.app", "flower", f"--port={port}",
                               "--address=127.0.0.1"], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "flower.log", "wb"), start_new_session=True)  # noqa: SIM115
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/healthcheck", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until("Flower to answer", up, timeout=60, every=0.5)
        start_workers(1)
        record = control.ingest("flower", scifact_subset(tmp_path / "c.jsonl", 60), str(need(M2V_MINILM)),
                                batch_size=20)
        assert control.wait(record.id, timeout=120).state == MigrationState.LIVE

        def names() -> set[str]:
            return {t["name"] for t in httpx.get(url + "/api/tasks", timeout=5).json().values()}

        wait_until("Flower to list the tasks", lambda: {"reembed.batch", "reembed.finalize"} <= names(), timeout=60,
                   every=0.5)
    finally:
        flower.terminate()
        flower.wait(timeout=20)
