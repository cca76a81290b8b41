"""Faults 6 and 7: the producer SIGKILLed while enqueueing; two producers on one alias at once.

A migration's producer is its pump task (on a control worker); an ingest's producer is the
`reembed ingest` process itself. Both are killed for real here and started again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from producer import ControlPlane
from reembed.progress import Progress
from reembed.registry import MigrationState
from cli.services import Workers
from reembed.settings import Settings
from tests.conftest import M2V_MINILM, M2V_MPNET, need
from tests.faults.conftest import (
    BATCH,
    DOCS,
    VISIBILITY_S,
    Source,
    check_outcome,
    ingest_source,
    read_all,
    scifact_subset,
    wait_until,
)

pytestmark = pytest.mark.integration


def cli(settings: Settings, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, **settings.to_env(), "HF_HUB_OFFLINE": "1", "REEMBED_LOG_FORMAT": "json"}
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def test_ingest_producer_sigkilled_while_enqueueing_then_resumed(
        tmp_path: Path, settings: Settings, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    # Given a `reembed ingest` of 2,000 documents feeding two workers in batches of 20
    corpus = scifact_subset(tmp_path / "corpus.jsonl", DOCS)
    for _ in range(2):
        start_workers(1, visibility_timeout_s=VISIBILITY_S)
    producer = cli(settings, "ingest", "killed", str(corpus), "--model", str(need(M2V_MINILM)),
                   "--batch-size", str(BATCH))
    # When the producer process is SIGKILLed after it has enqueued some of the batches
    wait_until("the ingest to be registered", lambda: bool(control.registry.migrations("killed")), timeout=60)
    record = control.registry.migrations("killed")[0]
    progress = Progress(control.redis, record.id)
    wait_until("30 batches enqueued", lambda: int(progress.get().get("enqueued_batches", 0)) >= 30, timeout=120)
    os.killpg(producer.pid, signal.SIGKILL)
    producer.wait()
    enqueued = int(progress.get()["enqueued_batches"])
    assert enqueued < DOCS // BATCH, "the producer finished before the kill; the test proves nothing"
    # ... and the same ingest is resumed
    resumed = cli(settings, "resume", record.id)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read() if resumed.stderr else ""
    # Then it completes with every document exactly once
    ids = {json.loads(line)["_id"] for line in corpus.read_text().splitlines()}
    check_outcome(control, Source("killed", "", ids, target_model=str(need(M2V_MINILM))), record)


def test_migration_pump_sigkilled_while_enqueueing_then_another_control_worker(
        tmp_path: Path, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    # Given an alias, two embedding workers and a separate control worker that runs the pump
    source, workers = ingest_source(tmp_path, control, start_workers)
    for w in workers:
        w.stop()
    for _ in range(2):
        start_workers(1, queues="reembed.batches", visibility_timeout_s=VISIBILITY_S)
    pump_worker = start_workers(1, queues="reembed.control", visibility_timeout_s=VISIBILITY_S)
    migration = control.migrate(source.alias, source.target_model, batch_size=BATCH)
    progress = Progress(control.redis, migration.id)
    # When the control worker is SIGKILLed while the pump is still enqueueing
    wait_until("12 batches enqueued", lambda: int(progress.get().get("enqueued_batches", 0)) >= 12, timeout=120)
    assert pump_worker.process is not None
    os.killpg(pump_worker.process.pid, signal.SIGKILL)
    pump_worker.process.wait()
    assert progress.get().get("enqueue_complete") != "1", "enqueueing finished before the kill"
    # ... and `reembed resume` is run while another control worker starts
    start_workers(1, queues="reembed.control", visibility_timeout_s=VISIBILITY_S)
    control.resume(migration.id)
    # Then the migration completes: nothing lost, nothing twice
    check_outcome(control, source, migration)


def test_two_producers_on_one_alias_exactly_one_migration_runs(
        tmp_path: Path, settings: Settings, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    # Given an alias
    source, _ = ingest_source(tmp_path, control, start_workers, n=300)
    # When two `reembed migrate` processes start on it at the same moment
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: cli(settings, "migrate", source.alias, "--to", str(need(M2V_MPNET))),
                             range(2)))
        outcomes = [(p.wait(timeout=120), p.stdout.read() if p.stdout else "", p.stderr.read() if p.stderr else "")
                    for p in runs]
    # Then exactly one succeeded and the other was refused with a clear message
    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 2], outcomes
    refusal = next(err for code, _, err in outcomes if code == 2)
    assert source.alias in refusal and ("another producer" in refusal or "reembed cancel" in refusal)
    assert len(control.registry.migrations(source.alias)) == 2  # the ingest and one migration
    started = next(m for m in control.registry.migrations(source.alias) if m.kind == "migrate")
    check_outcome(control, source, started)
    assert started.state != MigrationState.FAILED
    assert read_all(control, started.target_collection)[0]
