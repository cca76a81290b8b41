"""Faults 1 and 2: worker processes SIGKILLed mid-migration (the whole worker, not a pool child)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from producer import ControlPlane
from cli.services import Workers
from tests.faults.conftest import BATCH, DOCS, VISIBILITY_S, check_outcome, ingest_source, wait_for_progress

pytestmark = pytest.mark.integration


def sigkill(workers: Workers) -> None:
    """Kill the worker's whole process group: the main process and its pool, no warm shutdown."""
    assert workers.process is not None and workers.process.poll() is None
    os.killpg(workers.process.pid, signal.SIGKILL)
    workers.process.wait()


def test_one_worker_sigkilled_mid_batch_then_replaced(
        tmp_path: Path, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    # Given a 2,000-document migration running on two worker processes
    source, (first, _second) = ingest_source(tmp_path, control, start_workers)
    migration = control.migrate(source.alias, source.target_model, batch_size=BATCH)
    # When one whole worker is SIGKILLed while batches are in flight, and another one started
    wait_for_progress(control, migration.id, DOCS // 4)
    sigkill(first)
    start_workers(1, visibility_timeout_s=VISIBILITY_S)
    # Then the migration completes: every document exactly once, with the new model's vector
    check_outcome(control, source, migration)


def test_every_worker_sigkilled_then_started_later(
        tmp_path: Path, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    # Given a 2,000-document migration running on two worker processes
    source, workers = ingest_source(tmp_path, control, start_workers)
    migration = control.migrate(source.alias, source.target_model, batch_size=BATCH)
    # When both are SIGKILLed at once, and nothing runs for a while
    done_at_kill = wait_for_progress(control, migration.id, DOCS // 3)
    for w in workers:
        sigkill(w)
    time.sleep(3)
    stalled = control.status(migration.id)
    assert stalled["state"] == "running" and stalled["done"] < DOCS
    assert stalled["done"] >= done_at_kill  # counters never go backwards
    # ... and two workers are started again later
    for _ in range(2):
        start_workers(1, visibility_timeout_s=VISIBILITY_S)
    # Then the migration completes with nothing lost or duplicated
    check_outcome(control, source, migration)
