"""The HTTP control API against the real server (``reembed serve`` on loopback), real Redis,
Chroma and workers: a migration driven only over HTTP by a client that does not import reembed,
the two key scopes, ``Idempotency-Key`` under concurrent retries, and the events stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cli.services import Workers, free_port
from producer import ControlPlane
from reembed.registry import MigrationState
from reembed.settings import Settings
from tests.conftest import M2V_MINILM, M2V_MPNET, need
from tests.integration.conftest import scifact_subset

pytestmark = pytest.mark.integration

ADMIN, READ = "admin-key-for-tests-0b9d", "read-key-for-tests-77c1"


@pytest.fixture
def server(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """``reembed serve`` with both keys, as its own process; yields its URL."""
    port = free_port()
    env = {**os.environ, **settings.to_env(), "REEMBED_API_KEY": READ, "REEMBED_ADMIN_KEY": ADMIN,
           "HF_HUB_OFFLINE": "1", "REEMBED_CUTOVER_WAIT_S": "0"}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - the server's lifetime
    process = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    yield url
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    log.close()
    said = (tmp_path / "serve.log").read_text()
    assert ADMIN not in said and READ not in said, "a key was logged"


def test_a_migration_driven_only_over_http_by_a_client_that_does_not_import_reembed(
        server: str, start_workers: Callable[..., Workers], tmp_path: Path) -> None:
    start_workers(2)
    corpus = scifact_subset(tmp_path / "corpus.jsonl", 120)
    walk = Path(__file__).with_name("control_walkthrough.py")
    done = subprocess.run([sys.executable, "-I", str(walk), server, ADMIN, READ, str(corpus),
                           str(need(M2V_MINILM)), str(need(M2V_MPNET))], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["imported_reembed"] == []
    assert seen["ingest"]["state"] == "live" and seen["ingest"]["done"] == 120
    assert seen["complete"]["state"] == "complete" and seen["complete"]["done"] == 120
    assert seen["refused_cutover"][0] == 403  # the read key may not switch an alias
    assert seen["cutover"]["live_collection"] == seen["complete"]["target_collection"]
    assert seen["search"]["served_by"]["collection"] == seen["complete"]["target_collection"]
    assert seen["rollback"]["live_collection"] == seen["ingest"]["target_collection"]
    assert [row["migration_id"] for row in seen["history"]["migrations"]][:2] == \
        [seen["migration_id"], seen["ingest"]["migration_id"]]
    # Every state change of the migration, once each, in order.
    mine = [e["event"] for e in seen["events"]["events"] if e["migration_id"] == seen["migration_id"]]
    assert mine == ["started", "verifying", "complete", "live", "rolled_back"], mine
    ingest = [e["event"] for e in seen["events"]["events"] if e["migration_id"] == seen["ingest"]["migration_id"]]
    assert ingest[0] == "started" and ingest[-1] == "live" and len(ingest) == len(set(ingest)), ingest


def test_scopes_and_ten_identical_concurrent_posts_start_one_migration(
        server: str, settings: Settings, start_workers: Callable[..., Workers], tmp_path: Path) -> None:
    start_workers(1)
    control = ControlPlane(settings)
    record = control.ingest("same", scifact_subset(tmp_path / "corpus.jsonl", 40), str(need(M2V_MINILM)))
    assert control.wait(record.id, timeout=300).state == MigrationState.LIVE
    body = {"to_model": str(need(M2V_MPNET)), "cutover": "manual"}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    # Scopes: no key 401, an unknown key 401, the read key 403 on a change, 200 on a read.
    assert httpx.post(f"{server}/aliases/same/migrations", json=body).status_code == 401
    assert httpx.post(f"{server}/aliases/same/migrations", json=body,
                      headers={"Authorization": "Bearer nope"}).status_code == 401
    refused = httpx.post(f"{server}/aliases/same/migrations", json=body, headers={"Authorization": f"Bearer {READ}"})
    assert refused.status_code == 403 and "REEMBED_ADMIN_KEY" in refused.json()["detail"]
    assert httpx.get(f"{server}/migrations/{record.id}", headers={"Authorization": f"Bearer {READ}"}).status_code == 200
    assert len(control.registry.migrations("same")) == 1, "a refused request changed nothing"
    # Bad input and unknown things: 422 and 404, named.
    bad = httpx.post(f"{server}/aliases/same/migrations", json={**body, "batch_size": 0}, headers=admin)
    assert bad.status_code == 422
    missing = httpx.post(f"{server}/aliases/nosuch/migrations", json=body, headers=admin)
    assert missing.status_code == 404 and "nosuch" in missing.json()["detail"]

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{server}/aliases/same/migrations", json=body, timeout=120,
                          headers={**admin, "Idempotency-Key": "retry-0001"})

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(post, range(10)))
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    assert len({a.json()["migration_id"] for a in answers}) == 1
    assert [m.kind for m in control.registry.migrations("same")] == ["migrate", "ingest"]
    # The same key for another request is refused; a new key starts what it asks (here: a 409,
    # one migration of an alias at a time) and that answer too is kept.
    reused = httpx.post(f"{server}/aliases/same/migrations", json={**body, "cutover": "auto"},
                        headers={**admin, "Idempotency-Key": "retry-0001"})
    assert reused.status_code == 422 and "another request" in reused.json()["detail"]
    second = [httpx.post(f"{server}/aliases/same/migrations", json=body,
                         headers={**admin, "Idempotency-Key": "retry-0002"}) for _ in range(2)]
    assert [s.status_code for s in second] == [409, 409] and second[0].json() == second[1].json()
    assert len(control.registry.migrations("same")) == 2

    # Long work is a job: a plan, polled until done.
    accepted = httpx.post(f"{server}/aliases/same/plans", json={"to_model": str(need(M2V_MPNET)), "sample": 20},
                          headers=admin)
    assert accepted.status_code == 202 and accepted.json()["state"] in ("queued", "running", "done")
    job_url = f"{server}/jobs/{accepted.json()['job_id']}"
    deadline = time.monotonic() + 300
    while (job := httpx.get(job_url, headers={"Authorization": f"Bearer {READ}"}).json())["state"] != "done":
        assert job["state"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.3)
    assert job["result"]["bound_by"] in ("model", "chroma") and job["result"]["docs_per_s"] > 0
    assert httpx.get(f"{server}/jobs/nosuchjob", headers=admin).status_code == 404
    # A state the request does not fit is a 409; a cancel is idempotent.
    migration_id = answers[0].json()["migration_id"]
    control.wait(migration_id, timeout=300)
    assert httpx.post(f"{server}/migrations/{migration_id}/resume", headers=admin).status_code == 409
    cancelled = httpx.post(f"{server}/migrations/{migration_id}/cancel", headers=admin)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = httpx.post(f"{server}/migrations/{migration_id}/cancel", headers=admin)
    assert again.status_code == 200 and again.json()["state"] == "cancelled"
    assert httpx.post(f"{server}/migrations/{migration_id}/pause", headers=admin).status_code == 409


def test_the_control_api_is_off_without_an_admin_key(settings: Settings) -> None:
    from fastapi.testclient import TestClient

    from cli.service import create_service

    with TestClient(create_service(settings.with_(api_key="", admin_key=""))) as client:
        off = client.post("/aliases/any/migrations", json={"to_model": "x"})
        assert off.status_code == 403 and "REEMBED_ADMIN_KEY" in off.json()["detail"]
        assert client.get("/migrations/none").status_code == 404  # reads are open without a read key


def test_the_queue_depth_metric_follows_a_migration_on_a_real_scrape(
        settings: Settings, start_workers: Callable[..., Workers], tmp_path: Path) -> None:
    """``reembed exporter`` (no search service): batches wait while no worker runs, with their
    age; once workers run they fall to 0."""
    port = free_port()
    env = {**os.environ, **settings.to_env(), "HF_HUB_OFFLINE": "1"}
    exporter = subprocess.Popen([sys.executable, "-m", "cli.main", "exporter", "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def scrape() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("reembed_")}

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                before = scrape()
                break
            except httpx.TransportError:
                assert exporter.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert before['reembed_queue_waiting_batches{queue="reembed.batches"}'] == 0
        control = ControlPlane(settings)
        corpus = scifact_subset(tmp_path / "corpus.jsonl", 400)
        with ThreadPoolExecutor(1) as pool:  # feeding waits for room while no worker runs
            feeding = pool.submit(control.ingest, "depth", corpus, str(need(M2V_MINILM)), 50)
            deadline = time.monotonic() + 60
            while (seen := scrape())['reembed_queue_waiting_batches{queue="reembed.batches"}'] < 4:
                assert time.monotonic() < deadline, seen
                time.sleep(0.2)
            time.sleep(1.5)
            seen = scrape()
            assert seen['reembed_queue_oldest_wait_seconds{queue="reembed.batches"}'] >= 1.0, seen
            assert seen["reembed_batches_in_flight"] >= 4 and seen["reembed_queue_up"] == 1
            start_workers(2)
            record = feeding.result(timeout=300)
        assert control.wait(record.id, timeout=300).state == MigrationState.LIVE
        after = scrape()
        assert after['reembed_queue_waiting_batches{queue="reembed.batches"}'] == 0
        assert after["reembed_batches_in_flight"] == 0
        assert 'reembed_queue_oldest_wait_seconds{queue="reembed.batches"}' not in after
    finally:
        exporter.send_signal(signal.SIGTERM)
        exporter.wait(timeout=30)


def test_the_control_api_fuzzed_from_its_schema_never_answers_5xx_and_a_refusal_changes_nothing(
        settings: Settings, start_workers: Callable[..., Workers], tmp_path: Path) -> None:
    """schemathesis over the control routes (valid and invalid requests, with the admin key): no
    5xx, and after every request answered 4xx the registry (aliases, migrations) is as before."""
    import threading

    import schemathesis
    import uvicorn
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hypothesis_settings
    from schemathesis.generation.modes import GenerationMode

    from cli.service import create_service

    start_workers(1)
    control = ControlPlane(settings)
    control.wait(control.ingest("fuzz", scifact_subset(tmp_path / "c.jsonl", 20), str(need(M2V_MINILM))).id,
                 timeout=120)
    port = free_port()
    app = create_service(settings.with_(api_key=READ, admin_key=ADMIN))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.2)

    def registry() -> list[str]:
        return sorted([a.model_dump_json() for a in control.registry.aliases()]
                      + [m.model_dump_json() for m in control.registry.migrations()])

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json").include(tag="control")
    seen: dict[int, int] = {}
    try:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hypothesis_settings(max_examples=120, deadline=None, database=None,
                                 suppress_health_check=list(HealthCheck))
            @given(case=schema.as_strategy(generation_mode=mode))
            def fuzz(case: schemathesis.Case) -> None:
                before = registry()
                response = case.call(timeout=60, headers={"Authorization": f"Bearer {ADMIN}"})
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
                if response.status_code >= 400:
                    assert registry() == before, (case.method, case.path, response.status_code, response.text[:300])

            fuzz()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert seen.get(404, 0) > 0 and seen.get(422, 0) > 0, seen  # the fuzz reached both kinds of refusal
